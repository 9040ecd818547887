"""The REST API (FastAPI). It records and enqueues jobs; it never imports torch or ``worker``."""
