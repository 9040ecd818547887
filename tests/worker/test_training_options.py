"""Training options proven (issue 16, item 7): gradient checkpointing changes no gradient, bf16
autocast runs a finite step. (That the saved model holds the EMA weights: test_training.py, on its
full tiny run.)"""

from __future__ import annotations

import pytest
import torch

from worker.model.diffusion import train_step
from worker.model.parts import encode_captions
from worker.model.training import TrainHooks, _Run, build

from tests.worker.test_training import tiny_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _parts(device="cpu", **overrides):
    params = tiny_params(**overrides)
    torch.manual_seed(params.seed)  # as train() does: the same initial weights for every variant
    return params, build(params, None, torch.device(device))


def _batch(parts, params, n=4, device="cpu"):
    g = torch.Generator().manual_seed(1)
    side = params.resolution // 4  # the tiny autoencoder's three blocks halve the side twice
    z0 = torch.randn(n, parts.vae.config.latent_channels, side, side, generator=g).to(device)
    context = encode_captions(parts.tokenizer, parts.text_encoder, ["a handwritten digit one"] * n, torch.device(device))
    return z0, context


def _unet_grads(parts, params) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """One Algorithm-1 step's loss and gradients (no optimiser step), and how many times the first
    down block's first ResNet ran forward (twice when checkpointing recomputes it in backward)."""
    unet = parts.unet.train()
    calls = []
    # a pre-hook: recomputation stops early, once it has what backward needs, before a forward hook would run
    hook = unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *a: calls.append(1))
    z0, context = _batch(parts, params)
    unet.zero_grad(set_to_none=True)
    loss = train_step(parts.diffusion, lambda z_t, t: unet(z_t, t, encoder_hidden_states=context).sample, z0,
                      generator=torch.Generator().manual_seed(2), gradient_step=lambda loss: loss.backward())
    hook.remove()
    return loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}, len(calls)


def test_gradient_checkpointing_gives_the_same_gradients():
    params, plain = _parts(gradient_checkpointing=False)
    _, ckpt = _parts(gradient_checkpointing=True)
    assert ckpt.unet.is_gradient_checkpointing and not plain.unet.is_gradient_checkpointing
    assert ckpt.vae.is_gradient_checkpointing  # the autoencoder stage uses it too
    loss_a, grads_a, calls_a = _unet_grads(plain, params)
    loss_b, grads_b, calls_b = _unet_grads(ckpt, params)
    assert (calls_a, calls_b) == (1, 2)  # checkpointing really recomputed the block in backward
    torch.testing.assert_close(loss_b, loss_a)
    assert grads_a.keys() == grads_b.keys() and all(g.abs().sum() > 0 for g in grads_a.values() if g.numel() > 8)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def _cpu_bf16_autocast() -> bool:
    try:
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    except RuntimeError:
        return False


def _bf16_skip(device: str) -> str | None:
    """Why a bf16 step cannot run on ``device`` here, or None."""
    if device == "cpu":
        return None if _cpu_bf16_autocast() else "this torch build has no bf16 autocast on the CPU"
    if not torch.cuda.is_available():
        return "no CUDA device here"
    return None if torch.cuda.is_bf16_supported() else "this CUDA device has no bf16"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_bf16_train_step_runs_under_autocast_and_is_finite(tmp_path, device):
    if _bf16_skip(device):
        pytest.skip(_bf16_skip(device))
    params, parts = _parts(device, mixed_precision="bf16")
    run = _Run(params, tmp_path, TrainHooks(), device, 10)  # the option as training reads it
    unet = parts.unet.train()
    z0, context = _batch(parts, params, device=device)
    seen = []
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in unet.parameters()]

    def eps_fn(z_t, t):
        with run.autocast():
            out = unet(z_t, t, encoder_hidden_states=context).sample
        seen.append(out.dtype)
        return out

    def gradient_step(loss):
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    loss = train_step(parts.diffusion, eps_fn, z0, generator=torch.Generator().manual_seed(2), gradient_step=gradient_step)
    assert seen == [torch.bfloat16]  # the U-Net really ran in bf16
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and 0 < loss.item() < 10
    after = list(unet.parameters())
    assert all(torch.isfinite(p).all() for p in after) and any(not torch.equal(a, b) for a, b in zip(after, before))
    # "no" and "auto" on a CPU: no autocast
    for mp in ("no", "auto"):
        with _Run(tiny_params(mixed_precision=mp), tmp_path, TrainHooks(), "cpu", 10).autocast():
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
