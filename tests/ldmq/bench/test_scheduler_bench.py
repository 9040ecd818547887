"""``ldmq bench scheduler --quick`` runs its three parts against a database of its own and prints
figures that parse and make sense. Figures are not asserted against targets (benchmarks print
them; docs/benchmarks.md records them): only that each is there, and that fairness is sane."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import create_engine, text

from ldmq.bench.scheduler import jain, main, pct
from tests.conftest import PG_ADMIN_URL

pytestmark = pytest.mark.slow  # ~30 s of simulated workers


def test_jain_and_percentiles():
    assert jain([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert jain([1.0, 0.0, 0.0]) == pytest.approx(1 / 3)
    assert pct([5, 1, 4, 2, 3], 50) == 3 and pct([5, 1, 4, 2, 3], 99) == 5


def test_quick_run_prints_every_figure_and_drops_its_database(capsys):
    admin = create_engine(PG_ADMIN_URL)
    with admin.connect() as c:
        before = set(c.execute(text("SELECT datname FROM pg_database")).scalars())
    assert main(["--quick", "--pg", PG_ADMIN_URL]) == 0
    out = capsys.readouterr().out
    with admin.connect() as c:
        after = set(c.execute(text("SELECT datname FROM pg_database")).scalars())
    admin.dispose()
    assert not {d for d in after - before if d.startswith("ldmq_bench_sched_")}

    scale = re.findall(r"^scale queued=(\d+) workers=(\d+) \((\d+) process(?:es)?\): ([\d.]+) claims/s, claim p50 ([\d.]+) ms "
                       r"p99 ([\d.]+) ms \(pool wait p99 ([\d.]+) ms; the claim statement's round trip p50 ([\d.]+) ms p99 ([\d.]+) ms\), "
                       r"utilisation ([\d.]+) %; a worker process of its own beside them: claim p50 ([\d.]+) ms "
                       r"p99 ([\d.]+) ms \((\d+) claims; their commits alone p50 ([\d.]+) ms p99 ([\d.]+) ms\), the same round trips doing nothing \(SELECT 1\) "
                       r"p50 ([\d.]+) ms p99 ([\d.]+) ms", out, re.M)
    assert {(q, w) for q, w, *_ in scale} == {("2000", "4"), ("2000", "8"), ("5000", "4"), ("5000", "8")}, out
    # --quick runs 4 simulated workers a process: 8 workers are two processes (ProcessFleet), 4 are threads of this one
    assert {(w, procs) for _, w, procs, *_ in scale} == {("4", "1"), ("8", "2")}, out
    for _, _, _, rate, p50, p99, _, s50, s99, util, solo50, solo99, solo_n, c50, c99, f50, f99 in scale:
        assert 0 < float(c50) <= float(c99) <= float(solo99)  # the commit is part of the claim
        assert float(rate) > 0 and 0 < float(p50) <= float(p99) and 0 < float(util) <= 100.5
        assert int(solo_n) > 0 and 0 < float(solo50) <= float(solo99) and 0 < float(f50) <= float(f99)
        assert 0 < float(s50) <= float(s99) and float(s50) <= float(p50)  # the round trip is part of the call
    assert "Index Scan using ix_jobs_claim" in out  # the EXPLAIN ANALYZE of the claim, on its index

    fair = re.search(r"^fairness .*: weight 1 share ([\d.]+) \(target 0\.143\), weight 2 share ([\d.]+) \(target 0\.286\), "
                     r"weight 4 share ([\d.]+) \(target 0\.571\); Jain ([\d.]+)", out, re.M)
    assert fair, out
    shares = [float(x) for x in fair.groups()[:3]]
    assert sum(shares) == pytest.approx(1.0, abs=0.01)
    assert shares[2] > shares[0]  # the weight-4 tenant got more than the weight-1 one
    assert 1 / 3 <= float(fair[4]) <= 1.0

    flood = re.search(r"^flood .*small-job wait p50 ([\d.]+) s p95 ([\d.]+) s under the flood \((\d+) jobs\), "
                      r"p50 ([\d.]+) s p95 ([\d.]+) s on an idle cluster \((\d+) jobs\); .*burst: wait p50 ([\d.]+) s "
                      r"p95 ([\d.]+) s \((\d+) jobs\)", out, re.M)
    assert flood, out
    assert int(flood[3]) > 0 and int(flood[6]) > 0 and int(flood[9]) == 4
    assert len(re.findall(r"^  .* \((met|missed)[;)]", out, re.M)) == 4
