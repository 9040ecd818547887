"""Code that both the API and the workers use: settings, database, storage, job schemas.

Imports point one way: ``api -> shared <- worker``. Nothing here imports torch, ``api`` or ``worker``.
"""
