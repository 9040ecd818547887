"""``ldmq bench train-speed`` runs its three loops and prints rates, ratios and (d)'s breakdown.

Figures are not asserted (benchmarks print them; docs/benchmarks.md records them): only that the
bench still runs and reports what it claims to, on a tiny config."""

import re

import pytest

from ldmq.bench.train import params_with_overrides
from ldmq.bench.train_speed import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--set", "unet_channels=[16,32]", "--set", "autoencoder_channels=[8,16,16]", "--set", "attention_heads=1"]


def test_three_loops_report_rates_ratios_and_the_breakdown(capsys):
    assert main(["--steps", "2", "--warmup", "1", "--rounds", "1", "--threads", "1", "--batch-size", "8", *TINY]) == 0
    out = capsys.readouterr().out
    assert "unet_channels=[16,32]" in out.splitlines()[0]  # the overrides are stated with the figures
    rates = {m[1]: float(m[2]) for m in re.finditer(r"^\((d|u|c)\) .*?(\d+\.\d+) steps/s", out, re.M)}
    assert set(rates) == {"d", "u", "c"} and all(r > 0 for r in rates.values())
    ratio = float(re.search(r"c/d (\d+\.\d+)", out)[1])
    assert ratio == pytest.approx(rates["c"] / rates["d"], abs=0.01)
    breakdown = re.search(r"batch fetch ([\d.]+) ms, VAE encode ([\d.]+) ms, text encoder ([\d.]+) ms, "
                          r"U-Net step \+ optimizer \+ EMA ([\d.]+) ms", out)
    assert breakdown and all(float(x) > 0 for x in breakdown.groups())


@pytest.mark.parametrize(("item", "message"), [
    ("unet_channels", "expected FIELD=JSON"),
    ("unet_channels=[16,", "Expecting"),
    ("no_such_field=1", "no_such_field"),
    ("batch_size=0", "batch_size"),
])
def test_a_bad_override_exits_with_the_reason(item, message):
    with pytest.raises(SystemExit) as e:
        params_with_overrides({"dataset": "builtin:digits"}, [item])
    assert message in str(e.value)
