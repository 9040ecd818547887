"""The GPU/CPU side of ldmq: Celery tasks, sampling and training with torch and diffusers."""
