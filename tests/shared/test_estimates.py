"""shared.estimates: the measured step timings, folded into an average and read back."""

from __future__ import annotations

import uuid

import pytest

from shared import estimates
from shared.db import session_scope
from shared.models import StepTiming
from shared.train_schema import TrainParams


def _record(settings, key, seconds, units=10, **kw):
    figure = dict(kind="denoise", model_key=key, size="32x32", batch=4, guidance=True, device="cpu")
    figure.update(kw)
    with session_scope(settings) as s:
        estimates.record(s, **figure, seconds=seconds, units=units)


def test_record_folds_runs_into_a_weighted_average(settings):
    key = uuid.uuid4().hex
    _record(settings, key, 2.0)
    _record(settings, key, 1.0, units=5)
    with session_scope(settings) as s:
        row = s.get(StepTiming, ("denoise", key, "32x32", 4, True, "cpu"))
        assert row.seconds == pytest.approx(0.7 * 2.0 + 0.3 * 1.0) and row.samples == 15
        found = estimates.best(s, "denoise", key)
    assert (found.seconds, found.batch, found.guidance, found.device) == (pytest.approx(1.7), 4, True, "cpu")
    # Nothing measured (zero units, zero seconds) changes nothing; an unknown kind is refused by name.
    _record(settings, key, 5.0, units=0)
    _record(settings, key, 0.0)
    with session_scope(settings) as s:
        assert s.get(StepTiming, ("denoise", key, "32x32", 4, True, "cpu")).samples == 15
        with pytest.raises(ValueError, match="valid: denoise"):
            estimates.record(s, kind="sampling", model_key=key, size="1x1", batch=1, guidance=False, device="cpu",
                             seconds=1.0, units=1)


def test_best_takes_the_device_measured_last_and_its_most_measured_batch(settings):
    key = uuid.uuid4().hex
    _record(settings, key, 9.0, units=100, device="cuda:Old GPU")
    _record(settings, key, 0.5, units=10, batch=8)
    _record(settings, key, 0.3, units=50, batch=16)
    with session_scope(settings) as s:
        found = estimates.best(s, "denoise", key)
        assert (found.device, found.batch, found.seconds) == ("cpu", 16, pytest.approx(0.3))
        assert estimates.best(s, "denoise", key, batch=8).seconds == pytest.approx(0.5)
        assert estimates.best(s, "denoise", key, device="cuda:Old GPU").seconds == pytest.approx(9.0)
        assert estimates.best(s, "denoise", key, size="64x64") is None
        assert estimates.best(s, "denoise", key, guidance=False) is None


def test_train_keys_change_with_the_architecture_not_the_schedule():
    base = TrainParams(dataset="builtin:digits")
    same = TrainParams(dataset="builtin:digits", steps=10, learning_rate=1e-4, seed=7, checkpoint_every=3)
    wider = TrainParams(dataset="builtin:digits", unet_channels=[64, 64])
    assert estimates.train_keys(base) == estimates.train_keys(same)
    k, w = estimates.train_keys(base), estimates.train_keys(wider)
    assert k["train_unet"] != w["train_unet"] and k["train_autoencoder"] == w["train_autoencoder"]
    assert set(k) == {"train_autoencoder", "train_unet", "eval_autoencoder", "eval_unet"}
    assert all(v.startswith("train:") and len(v) <= 80 for v in k.values())
