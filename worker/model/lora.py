"""LoRA: low-rank adapters on a base pipeline's U-Net, trained and sampled with peft and diffusers.

LoRA (Hu et al. 2021) freezes every weight W of the base and learns, for each targeted linear or
convolution layer, ΔW = B A with A ∈ R^{r×k}, B ∈ R^{d×r} and a rank r ≪ min(d, k); the layer
computes W x + (α / r) B A x. A starts Gaussian and B at zero, so training starts from the base
model exactly. On the tiny test pipeline rank 4 on the attention projections trains 5.5k of the
U-Net's 0.3M weights, and the adapter file is 31 KB (docs/benchmarks.md has a larger base).

Training follows diffusers' ``examples/text_to_image/train_text_to_image_lora.py``: a peft
``LoraConfig`` (``init_lora_weights="gaussian"``) added with ``unet.add_adapter``, only the adapter's
parameters trainable, and the result saved with ``get_peft_model_state_dict`` →
``convert_state_dict_to_diffusers`` → ``StableDiffusionPipeline.save_lora_weights`` (safetensors,
with the peft config as metadata so that α ≠ r loads right), which plain diffusers reads with
``load_lora_weights``.

Sampling loads the base pipeline once (``worker.model.pipelines.PipelineCache``) and switches
adapters on it (:func:`use_adapter`): each LoRA model's adapter is loaded once under its model id
(at most :data:`MAX_ADAPTERS` per pipeline, least recently used dropped), then ``set_adapters``
activates it alone; the plain base disables them (peft then computes W x only, bit for bit the base).
"""

from __future__ import annotations

from pathlib import Path

import torch

from shared.adapters import ADAPTER_WEIGHTS, check_adapter_dir
from shared.train_schema import TrainParams

# Adapters kept loaded on one cached pipeline: each is small (31 KB on the tiny pipeline, ~3 MB at
# rank 4 on Stable Diffusion 1.5's attention), but every loaded one adds a wrapped layer to walk.
MAX_ADAPTERS = 8
_LRU_ATTR = "_ldmq_adapter_lru"  # the adapter names on a cached pipeline, least recently used first


def add_lora(unet, params: TrainParams) -> None:
    """Freeze the U-Net and give it a fresh adapter of ``params``' rank, α and targets (A Gaussian,
    drawn from torch's global generator; B zero)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=params.lora_rank, lora_alpha=params.lora_alpha, init_lora_weights="gaussian",
                                target_modules=list(params.lora_target_modules)))


def trained_parameters(unet, params: TrainParams) -> tuple[list[str], list[torch.nn.Parameter]]:
    """The names and parameters a run optimises, in a fixed order (the optimiser's and EMA's state
    in a checkpoint is by that position): every U-Net weight, or (method lora) the adapter's."""
    if params.method == "lora":
        named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
        if not named or any(".lora_" not in n for n, _ in named):
            raise ValueError("method 'lora': the U-Net must carry an adapter and nothing else trainable")
    else:
        unet.requires_grad_(True)
        named = list(unet.named_parameters())
    return [n for n, _ in named], [p for _, p in named]


class AdapterWeights:
    """The adapter's weights of a U-Net as a checkpoint module (``state_dict``/``load_state_dict``,
    what :mod:`worker.model.checkpoint` calls): a checkpoint of a LoRA run holds these, not the
    frozen base it can load again."""

    def __init__(self, unet, names: list[str]):
        self.unet, self.names = unet, names

    def state_dict(self) -> dict[str, torch.Tensor]:
        params = dict(self.unet.named_parameters())
        return {n: params[n].detach() for n in self.names}

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        params = dict(self.unet.named_parameters())
        missing, unexpected = set(self.names) - set(state), set(state) - set(self.names)
        if strict and (missing or unexpected):
            raise ValueError(f"adapter weights do not match: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        with torch.no_grad():
            for n in self.names:
                params[n].copy_(state[n])


def save_adapter(unet, out_dir: Path) -> Path:
    """Save ``unet``'s adapter in diffusers' LoRA format (one safetensors file, the peft config as
    its metadata), as train_text_to_image_lora.py does; returns the folder."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(
        out_dir, unet_lora_layers=state, safe_serialization=True, weight_name=ADAPTER_WEIGHTS,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    return out_dir


def use_adapter(pipe, name: str | None, adapter_dir: Path | None = None) -> None:
    """Make ``pipe`` (a cached base pipeline) sample as LoRA model ``name`` (its adapter loaded from
    ``adapter_dir`` the first time), or as the plain base when ``name`` is None. Not thread-safe:
    call it before a run's model streams start (one job at a time per executor)."""
    lru: list[str] = getattr(pipe, _LRU_ATTR, [])
    setattr(pipe, _LRU_ATTR, lru)
    if name is None:
        if lru:
            pipe.disable_lora()
        return
    if name not in lru:
        if adapter_dir is None:
            raise ValueError(f"adapter {name!r} is not loaded and no folder was given")
        check_adapter_dir(adapter_dir)  # one safetensors file, nothing to unpickle
        while len(lru) >= MAX_ADAPTERS:
            pipe.delete_adapters(lru.pop(0))
        pipe.load_lora_weights(str(adapter_dir), adapter_name=name, weight_name=ADAPTER_WEIGHTS,
                               use_safetensors=True, local_files_only=True)
    else:
        lru.remove(name)
    lru.append(name)
    pipe.enable_lora()
    pipe.set_adapters([name])
