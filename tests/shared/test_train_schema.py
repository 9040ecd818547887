"""TrainParams: the body of POST /v1/jobs/train."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.train_schema import TrainParams


def test_defaults_from_the_dataset_alone():
    p = TrainParams(dataset="builtin:digits")
    assert p.base_model is None and p.batch_size == 64 and p.learning_rate == 2e-3 and p.min_snr_gamma == 5.0
    assert p.latent_channels == 2 and p.kl_weight == 1e-4
    assert p.autoencoder_channels == [16, 32, 64] and p.autoencoder_steps == 200 and p.steps == 1400 and p.unet_channels == [32, 64] and p.resolution == 32
    assert p.warmup_steps == 100 and p.grad_clip == 1.0 and p.ema and p.caption_dropout == 0.1
    assert p.total_steps == p.steps + p.autoencoder_steps
    assert TrainParams(dataset="ds_1", base_model="m_1").total_steps == p.steps


def test_unknown_fields_are_rejected():
    with pytest.raises(ValidationError) as exc:
        TrainParams(dataset="builtin:digits", epochs=3)
    assert exc.value.errors()[0]["type"] == "extra_forbidden"


def test_unknown_builtin_lists_the_valid_ones():
    with pytest.raises(ValidationError, match="valid: builtin:digits"):
        TrainParams(dataset="builtin:cifar10")


def test_choices_list_their_valid_values():
    with pytest.raises(ValidationError, match="'ddpm', 'ddim', 'dpm-solver\\+\\+' or 'langevin-pc'"):
        TrainParams(dataset="builtin:digits", eval_scheduler="euler")
    with pytest.raises(ValidationError, match="'auto', 'no' or 'bf16'"):
        TrainParams(dataset="builtin:digits", mixed_precision="fp16")


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"resolution": 36}, "multiple of 8"),
        ({"resolution": 24, "autoencoder_channels": [32, 64, 64, 64, 64]}, "not divisible by the autoencoder's factor 16"),
        ({"resolution": 16, "unet_channels": [32, 64, 64, 64]}, "latent side 4 is not divisible"),
        ({"unet_channels": [30, 60]}, "multiple of 8"),
        ({"attention_heads": 3}, "divisible by attention_heads=3"),
        ({"steps": 0}, "greater than or equal to 1"),
        ({"batch_size": 0}, "greater than or equal to 1"),
        ({"learning_rate": 0}, "greater than 0"),
        ({"caption_dropout": 1.0}, "less than 1"),
        ({"validation_prompts": ["ok", " "]}, "non-empty"),
    ],
)
def test_invalid_values(fields, message):
    with pytest.raises(ValidationError, match=message):
        TrainParams(dataset="builtin:digits", **fields)


def test_round_trips_through_json():
    p = TrainParams(dataset="builtin:digits", seed=3, min_snr_gamma=5.0)
    assert TrainParams.model_validate_json(p.model_dump_json()) == p


def test_method_defaults_to_full_and_lora_needs_a_base_model():
    assert TrainParams(dataset="builtin:digits").method == "full"
    with pytest.raises(ValidationError, match="give base_model"):
        TrainParams(dataset="builtin:digits", method="lora")
    with pytest.raises(ValidationError, match="'full' or 'lora'"):
        TrainParams(dataset="builtin:digits", base_model="m_1", method="dreambooth")


def test_lora_alpha_defaults_to_the_rank_and_round_trips():
    p = TrainParams(dataset="ds_1", base_model="m_1", method="lora", lora_rank=8)
    assert p.lora_alpha == 8.0 and p.lora_target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    again = TrainParams.model_validate(p.model_dump(mode="json"))
    assert again == p
    assert TrainParams(dataset="ds_1", base_model="m_1", method="lora", lora_rank=8, lora_alpha=16).lora_alpha == 16


def test_unknown_lora_target_modules_list_the_valid_ones():
    from shared.train_schema import LORA_TARGET_MODULES

    with pytest.raises(ValidationError) as exc:
        TrainParams(dataset="ds_1", base_model="m_1", method="lora", lora_target_modules=["to_q", "attn9"])
    msg = str(exc.value)
    assert "'attn9'" in msg and all(m in msg for m in LORA_TARGET_MODULES)
    with pytest.raises(ValidationError, match="twice"):
        TrainParams(dataset="ds_1", base_model="m_1", method="lora", lora_target_modules=["to_q", "to_q"])


def test_lora_fields_are_refused_with_full_fine_tuning():
    with pytest.raises(ValidationError, match="lora_rank, lora_alpha apply only to method 'lora'"):
        TrainParams(dataset="ds_1", base_model="m_1", lora_rank=8, lora_alpha=2)
