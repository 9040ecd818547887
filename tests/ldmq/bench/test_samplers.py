"""``ldmq bench samplers`` compares samplers at equal network evaluations on one model."""

import json

from ldmq.bench import samplers


def test_rows_spend_at_most_the_budget():
    args = samplers._parser().parse_args(["--nfe", "20", "50", "--snr", "0.16", "--predictors", "ddim"])
    rows = {label: (name, steps, nfe) for label, name, steps, nfe, _ in samplers._rows(args)}
    assert rows["PC ddim 10+9 r=0.16"] == ("langevin-pc", 10, 19)
    assert rows["PC ddim 25+24 r=0.16"] == ("langevin-pc", 25, 49)
    assert rows["DPM-Solver++ 20"] == ("dpm-solver++", 20, 20) and rows["DDPM 1000"] == ("ddpm", 1000, 1000)
    assert all(nfe <= 50 for label, (_, _, nfe) in rows.items() if label != "DDPM 1000")


def test_runs_on_a_tiny_pipeline_and_writes_its_figures(tiny_pipeline_dir, tmp_path, capsys):
    argv = ["--pipeline", str(tiny_pipeline_dir), "--samples", "10", "--nfe", "4", "--predictors", "ddim",
            "--ddpm-1000", "0", "--threads", "1", "--workdir", str(tmp_path)]
    assert samplers.main(argv) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["label"], r["nfe"]) for r in rows] == [
        ("DDIM 4", 4), ("DPM-Solver++ 4", 4), ("DDPM 4", 4), ("DDIM 2", 2), ("PC ddim 2+1 r=0.16", 3)]
    assert all(0 <= r["accuracy"] <= 1 and r["frechet_ratio"] > 0 and r["sample_wall_s"] >= 0 for r in rows)
    # The same initial noise: DDIM 2 and its corrected twin differ only by the corrector.
    assert rows[3]["frechet"] != rows[4]["frechet"]
    assert "PC ddim 2+1 r=0.16" in capsys.readouterr().out
    assert len(list(tmp_path.glob("samples-*.png"))) == 5
