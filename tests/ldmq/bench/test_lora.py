"""``ldmq bench lora`` trains both methods on one base, each in its own process, and prints their
trained parameters, step time, peak memory and stored size. Figures are not asserted as timings
(docs/benchmarks.md records them); only what must hold whatever the machine: LoRA trains and
stores a small share of the U-Net."""

import re

import pytest

from ldmq.bench.lora import main


@pytest.mark.slow  # two spawned training processes
def test_lora_and_full_report_their_figures(capsys):
    assert main(["--steps", "2", "--warmup", "1", "--threads", "1", "--batch-size", "4", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    rows = {m[1]: [float(x.replace(",", "")) for x in m.groups()[1:]] for m in re.finditer(
        r"^(full|lora)\s+([\d,]+)\s+([\d.]+)%\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)}
    assert set(rows) == {"full", "lora"}
    (fp, fshare, fms, fcpu, fpeak, fkib), (lp, lshare, lms, lcpu, lpeak, lkib) = rows["full"], rows["lora"]
    assert fshare == 100.0 and 0 < lp < fp / 20 and lshare == pytest.approx(100 * lp / fp, abs=0.1)
    assert 0 < lkib < fkib / 10  # the adapter alone is stored
    assert min(fms, lms, fcpu, lcpu, fpeak, lpeak) > 0
    assert re.search(r"^lora/full: params 0\.\d+, step time [\d.]+, CPU time [\d.]+, peak memory [\d.]+, stored 0\.\d+$",
                     out, re.M)
    assert out.count("round 1 ") == 2
