"""The model: torch and diffusers only (no database, storage or Celery): diffusion math, data, model parts, schedulers, sampling, training (its checkpoints and evaluation), evaluation."""
