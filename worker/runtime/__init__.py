"""How a job runs, torch-free: errors, leases and claims, outcomes, the spawned executor, the output writer, metrics."""
