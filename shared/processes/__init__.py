"""The long-running processes that are neither the API nor a worker, one module each:

- :mod:`shared.processes.sweeper` (``ldmq sweeper``): re-enqueues jobs the broker lost, fails
  poison jobs, finishes abandoned cancels;
- :mod:`shared.processes.webhook_sender` (``ldmq webhooks``): delivers job events from the
  ``job_events`` outbox to each job's webhook.

What the API also needs of webhooks (signing, event names, URL rules) is in :mod:`shared.webhooks`.
"""
