"""ldmq: the command line (``ldmq``), the demo and the Python client."""
