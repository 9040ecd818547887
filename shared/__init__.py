"""Code that both the API and the workers use: settings, database, models, the job state machine,
storage, the queue and the names both sides check (``catalog``, ``train_schema``).

Imports point one way: ``api -> shared <- worker``. Nothing here imports torch, ``api`` or ``worker``.
"""
