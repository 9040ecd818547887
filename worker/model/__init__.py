"""The model: torch and diffusers only (no database, storage or Celery): diffusion math, builders, schedulers, sampling, training, evaluation."""
