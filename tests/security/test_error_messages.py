"""A job's ``error`` is read by its tenant: a code and a safe message. Storage keys, local paths
and exception text stay in the worker's log, under a reference the message gives."""

from __future__ import annotations

import logging

from shared.storage import StorageError, StorageUnavailable
from worker.runtime.outcome import classify


def test_an_internal_error_says_nothing_of_paths_or_text(caplog):
    exc = RuntimeError("open('/var/lib/ldmq/cache/models/abc/unet/secret.safetensors') failed: password=hunter2")
    with caplog.at_level(logging.ERROR):
        out = classify(exc, job_id="j1")
    assert out.kind == "failed" and out.error["code"] == "internal_error"
    message = out.error["message"]
    assert "/var/lib" not in message and "hunter2" not in message and "RuntimeError" not in message
    ref = message.split("reference ")[1].split(";")[0]
    assert any(ref in r.getMessage() and "hunter2" in str(r.exc_info[1]) for r in caplog.records)


def test_storage_errors_name_no_key(caplog):
    key = "tenant-a/jobs/j1/rows/000001/000.png"
    for exc, code in ((StorageError(f"S3 ClientError on {key!r}: AccessDenied"), "storage_error"),
                      (StorageUnavailable(f"object storage unreachable: put {key!r} failed 7 time(s)", retry_s=30),
                       "storage_unavailable")):
        with caplog.at_level(logging.WARNING):
            out = classify(exc, job_id="j1")
        assert out.error["code"] == code and key not in out.error["message"] and "tenant-a" not in out.error["message"]
        assert key in caplog.text  # the operator still has it
    assert "after 30 s of retries" in out.error["message"]
