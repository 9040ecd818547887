"""Training checkpoints: a directory of safetensors files and JSON — never pickle.

A checkpoint holds everything a resumed run needs to continue bit for bit where the interrupted one
stopped (same device and thread count): weights, optimiser moments, EMA weights, and the random
state (the training generator, torch's global generator, the batch order).

Files (format :data:`CHECKPOINT_FORMAT`; the names and keys are the format, so existing checkpoints
keep resuming only while they stay as they are):

- ``state.json`` — ``stage`` ("autoencoder" or "unet"), ``global_step``, ``stage_step``, ``params``
  (the job's TrainParams), ``loss_history`` ({stage: [[global step, loss], …]}), ``train_seconds``,
  ``train_cpu_seconds``, (U-Net stage) ``scaling_factor``, then ``format``, ``optimizer``
  (AdamW's param_groups: lr, betas, eps, weight decay, …), (with EMA) ``ema`` (its scalars: decay,
  optimization_step, …) and ``batch_pos``;
- ``<module>.safetensors`` — one per trained module's ``state_dict`` (``vae``, ``unet``; with
  ``method`` "lora" ``unet_lora``: the adapter's weights alone, peft's names, not the frozen base);
- ``optimizer.safetensors`` — AdamW's per-parameter tensors, keyed ``state.<param index>.<name>``
  (``step``, ``exp_avg``, ``exp_avg_sq``);
- ``ema_unet.safetensors`` — the EMA shadow parameters (of the trained ones: all the U-Net's, or the
  adapter's), keyed by their index ``"0"``, ``"1"``, …;
- ``rng.safetensors`` — ``generator`` (the training generator's state), ``torch_cpu`` (torch's
  global CPU generator) and ``batch_perm`` (the current epoch's permutation).

The evaluation written next to them (``metrics.json``, ``loss_curve.png``, ``samples.png``) is not
read back: see :mod:`worker.model.train_eval`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from shared.train_schema import TrainParams
from worker.model.data import BatchOrder

CHECKPOINT_FORMAT = 1
# Params that do not change the trained weights: a resumed job may differ in these.
NON_TRAINING_FIELDS = {
    "checkpoint_every",
    "keep_checkpoints",
    "validation_prompts",
    "eval_at_checkpoints",
    "eval_scheduler",
    "eval_steps",
    "eval_guidance_scale",
    "eval_guidance_candidates",
    "eval_num_samples",
    "vlb_timesteps",
    "gradient_checkpointing",
    "cache_latents",  # same random draws either way: only float rounding of the encoder differs
}


def write_checkpoint(
    ckpt_dir: Path,
    *,
    state: dict,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None,
    ema=None,
    generator: torch.Generator,
    batches: BatchOrder | None,
) -> Path:
    """Write one checkpoint directory (the files of the module docstring); ``state`` is the
    caller's part of ``state.json``, to which the format number and optimiser, EMA and batch
    position metadata are added (in that order)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, ckpt_dir / f"{name}.safetensors")
    state = dict(state, format=CHECKPOINT_FORMAT)
    if optimizer is not None:
        tensors, meta = _optimizer_to_files(optimizer)
        save_file(tensors, ckpt_dir / "optimizer.safetensors")
        state["optimizer"] = meta
    if ema is not None:
        save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)}, ckpt_dir / "ema_unet.safetensors")
        state["ema"] = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    rng = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if batches is not None:
        rng["batch_perm"] = batches.perm.clone()
        state["batch_pos"] = batches.pos
    save_file(rng, ckpt_dir / "rng.safetensors")
    (ckpt_dir / "state.json").write_text(json.dumps(state, indent=1))
    return ckpt_dir


def read_checkpoint_state(ckpt_dir: Path) -> dict:
    """``state.json`` of a checkpoint; ValueError for a format this code does not read."""
    state = json.loads((Path(ckpt_dir) / "state.json").read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{ckpt_dir}: checkpoint format {state.get('format')!r}; this code reads {CHECKPOINT_FORMAT}")
    return state


def check_resumable(state: dict, params: TrainParams) -> None:
    """ValueError unless ``params`` trains the same weights as the checkpoint's params (they may
    differ only in :data:`NON_TRAINING_FIELDS`)."""
    saved = state["params"]
    now = params.model_dump(mode="json")
    # A field added after the checkpoint was written (``method``, say) had its default then.
    fields = TrainParams.model_fields
    was = {k: saved[k] if k in saved else fields[k].get_default(call_default_factory=True) for k in now}
    diff = sorted(k for k in now if k not in NON_TRAINING_FIELDS and was[k] != now[k])
    if diff:
        raise ValueError(f"cannot resume: the checkpoint was trained with other values of {', '.join(diff)}")


def load_module_weights(module: torch.nn.Module, path: Path) -> None:
    """Load a module's weights from ``<module>.safetensors`` (every key must match)."""
    module.load_state_dict(load_file(path), strict=True)


def restore_training_state(ckpt_dir: Path, state: dict, *, optimizer, ema, generator, batches: BatchOrder) -> None:
    """Put the optimiser, the EMA (when given), the random generators and the batch order back
    where the checkpoint left them; the module weights are loaded with :func:`load_module_weights`."""
    _optimizer_from_files(optimizer, load_file(ckpt_dir / "optimizer.safetensors"), state["optimizer"])
    if ema is not None:
        shadow = load_file(ckpt_dir / "ema_unet.safetensors")
        device = ema.shadow_params[0].device
        ema.load_state_dict(dict(state["ema"], shadow_params=[shadow[str(i)].to(device) for i in range(len(shadow))]))
    rng = load_file(ckpt_dir / "rng.safetensors")
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch_cpu"])
    batches.perm, batches.pos = rng["batch_perm"], state["batch_pos"]


def _optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser's state_dict as (tensors for safetensors, JSON-able param_groups): tuples such
    as AdamW's betas become lists."""
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups}


def _optimizer_from_files(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """The inverse of :func:`_optimizer_to_files` (betas back to a tuple)."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})
