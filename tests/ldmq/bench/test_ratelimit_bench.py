"""``ldmq bench ratelimit`` end to end on small numbers: it prints the check's cost and the accepted
rate of two processes sharing one key (shared: about one bucket's worth; per process: about two)."""

from __future__ import annotations

import re

import pytest

from ldmq.bench import ratelimit

pytestmark = pytest.mark.slow


def test_the_bench_prints_its_figures(redis_url, capsys):
    assert ratelimit.main(["--calls", "100", "--rate", "20", "--seconds", "1.5", "--redis", redis_url]) == 0
    out = capsys.readouterr().out
    assert re.search(r"check, redis .*CPU +[\d.]+ us/call", out) and re.search(r"check, per-process .*p50", out)
    got = {m.group(1): int(m.group(2)) for m in re.finditer(r"1 key, (shared|per-process).*?accepted +(\d+)", out)}
    allowed = 20 + 20 * 1.5
    assert got["shared"] <= allowed + 1 < got["per-process"]
