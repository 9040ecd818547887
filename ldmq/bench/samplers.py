"""``ldmq bench samplers``: the samplers of one digits model at equal network evaluations.

One model (trained here with the defaults of ``POST /v1/jobs/train {"dataset": "builtin:digits"}``,
or given with ``--pipeline``, a saved pipeline folder) is sampled by every sampler on the same
prompts and initial noise (same seed), and each row prints the share of samples the SVC reads as
the requested digit, the Fréchet distance to the real digits over its real-vs-real floor (as
``ldmq bench train``), the network evaluations (NFE: U-Net passes of the guided batch) and the
wall time. For each NFE budget B (``--nfe``): DDIM B, DPM-Solver++ B, DDPM B (ancestral steps alone),
DDIM k (the predictor alone at langevin-pc's step count) and langevin-pc at k = ⌈B/2⌉ predictor
steps with M = 1 (k + (k − 1) ≤ B evaluations) for each predictor and signal-to-noise ratio
(``--snr``); plus DDPM 1000 (the seed's Algorithm 2) once.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldmq bench samplers", description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", type=Path, default=None, help="a saved pipeline folder (default: train one)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=200, help="samples per row (default 200)")
    p.add_argument("--guidance", type=float, default=2.0, help="guidance scale of every row (default 2)")
    p.add_argument("--nfe", type=int, nargs="+", default=[20, 50], help="network-evaluation budgets (default 20 50)")
    p.add_argument("--snr", type=float, nargs="+", default=[0.16], help="langevin-pc signal-to-noise ratios (default 0.16)")
    p.add_argument("--predictors", nargs="+", default=["ddim", "ddpm"], help="langevin-pc predictors (default ddim ddpm)")
    p.add_argument("--ddpm-1000", type=int, default=200, metavar="N", help="samples of DDPM 1000 (default 200; 0 skips)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    return p


def _train(workdir: Path, seed: int) -> Path:
    from shared.train_schema import TrainParams
    from worker.model.data import load_dataset
    from worker.model.training import TrainHooks, train

    params = TrainParams(dataset="builtin:digits", seed=seed, eval_at_checkpoints=False)
    t0 = time.perf_counter()
    result = train(params, workdir=workdir / "run", dataset=load_dataset("builtin:digits", resolution=params.resolution),
                   base_model_dir=None, hooks=TrainHooks())
    print(f"trained with the defaults in {time.perf_counter() - t0:.0f} s: {result.pipeline_dir}", flush=True)
    return result.pipeline_dir


def _rows(args) -> list[tuple[str, str, int, int, dict]]:
    """(label, scheduler name, steps, NFE, LangevinPCScheduler options or {}) for every row."""
    rows = []
    for budget in args.nfe:
        k = (budget + 1) // 2
        rows += [(f"DDIM {budget}", "ddim", budget, budget, {}),
                 (f"DPM-Solver++ {budget}", "dpm-solver++", budget, budget, {}),
                 (f"DDPM {budget}", "ddpm", budget, budget, {})]
        if k != budget:
            rows.append((f"DDIM {k}", "ddim", k, k, {}))
        for predictor in args.predictors:
            for snr in args.snr:
                rows.append((f"PC {predictor} {k}+{k - 1} r={snr:g}", "langevin-pc", k, 2 * k - 1,
                             {"predictor": predictor, "snr": snr}))
    if args.ddpm_1000:
        rows.append(("DDPM 1000", "ddpm", 1000, 1000, {}))
    return rows


def _measure(pipe, judge, scheduler, steps: int, n: int, args) -> dict:
    """Sample ``n`` class-balanced digits (timed alone) and judge them."""
    from worker.model import evaluation

    prompts, labels = evaluation.digit_prompts(n)
    clock = time.perf_counter()
    images = evaluation.generate(pipe, prompts, scheduler=scheduler, steps=steps, guidance_scale=args.guidance,
                                 seed=args.seed)
    r = {"sample_wall_s": round(time.perf_counter() - clock, 1), "num_samples": n, "images": images,
         "accuracy": judge.accuracy(images, labels), "frechet": judge.frechet(images)}
    r["frechet_floor"], r["frechet_floor_std"] = judge.floor(n, seed=args.seed)
    r["frechet_ratio"] = r["frechet"] / r["frechet_floor"]
    if n >= 200:  # the ratio grows with n (the floor is mostly the 1/n bias): also at n = 100, 10 of each digit
        r["ratio_n100"] = judge.frechet(images[:100]) / judge.floor(100, seed=args.seed)[0]
    return r


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    from worker.model import evaluation
    from worker.model.langevin import LangevinPCScheduler

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ldmq-bench-samplers-"))
    workdir.mkdir(parents=True, exist_ok=True)
    pipeline = args.pipeline or _train(workdir, args.seed)
    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline))
    judge = evaluation.DigitsJudge()
    results = []
    print(f"{'sampler':<26}{'NFE':>5}{'n':>5}{'accuracy':>10}{'Fréchet':>9}{'ratio':>7}{'n=100':>7}{'time':>8}", flush=True)
    for label, name, steps, nfe, options in _rows(args):
        n = args.ddpm_1000 if (name, steps) == ("ddpm", 1000) else args.samples
        scheduler = (LangevinPCScheduler.from_config(pipe.scheduler.config, corrector_steps=1, **options)
                     if options else name)
        r = _measure(pipe, judge, scheduler, steps, n, args)
        evaluation.image_grid_png(r.pop("images")[:100], workdir / f"samples-{label.replace(' ', '_')}.png", ncol=10)
        r.update(scheduler=name, label=label, steps=steps, nfe=nfe, options=options)
        results.append(r)
        print(f"{label:<26}{nfe:>5}{n:>5}{r['accuracy']:>10.3f}{r['frechet']:>9.1f}{r['frechet_ratio']:>7.2f}"
              f"{r.get('ratio_n100', float('nan')):>7.2f}{r['sample_wall_s']:>7.1f}s", flush=True)
    floors = sorted({(r["num_samples"], round(r["frechet_floor"], 1), round(r["frechet_floor_std"], 1)) for r in results})
    print("floors (n, mean, std over 20 draws of real digits): " + ", ".join(f"{n}: {m} ± {s}" for n, m, s in floors))
    (workdir / "bench.json").write_text(json.dumps({"pipeline": str(pipeline), "guidance": args.guidance,
                                                    "seed": args.seed, "rows": results}, indent=1, default=str))
    print(f"details: {workdir / 'bench.json'}; sample grids: {workdir}/samples-*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
