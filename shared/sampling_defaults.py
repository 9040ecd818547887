"""A model's sampling defaults: the scheduler, steps and guidance a sample job uses when its request
leaves them out. No torch: the API validates and resolves with this, the worker records it.

- A trained model records what its final evaluation chose (``worker.model.train_eval``: the
  evaluation's scheduler and steps, and for digits the guidance picked from a sweep); an imported
  model may state them (``POST /v1/models``). They live in ``Model.config[CONFIG_KEY]``.
- A request's value wins; else the model's default; else :data:`GLOBAL_DEFAULTS` (each field on
  its own: an import may state only its guidance).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.catalog import DEFAULT_SCHEDULER, SchedulerName

CONFIG_KEY = "sampling_defaults"
FIELDS = ("scheduler", "steps", "guidance_scale")
# What a request gets for a field that neither it nor its model sets (DPM-Solver++ 20 reaches DDPM
# 1000's quality; guidance 5, as before models carried their own).
GLOBAL_DEFAULTS: dict[str, Any] = {"scheduler": DEFAULT_SCHEDULER, "steps": 20, "guidance_scale": 5.0}
GUIDANCE_MAX = 50.0


class SamplingDefaults(BaseModel):
    """What a model states; any field may be left out (null), at least one is given. ``steps`` is also
    bounded by the deployment's ``max_steps`` (checked by the API)."""

    model_config = ConfigDict(extra="forbid")

    scheduler: SchedulerName | None = None
    steps: int | None = Field(default=None, ge=1, le=10_000)
    guidance_scale: float | None = Field(default=None, ge=0, le=GUIDANCE_MAX)

    @model_validator(mode="after")
    def _something(self) -> "SamplingDefaults":
        if all(getattr(self, f) is None for f in FIELDS):
            raise ValueError(f"sampling_defaults must set at least one of {', '.join(FIELDS)}")
        return self

    def stored(self) -> dict[str, Any]:
        """What goes into ``Model.config[CONFIG_KEY]``: the fields that are set."""
        return self.model_dump(mode="json", exclude_none=True)


def model_defaults(config: dict[str, Any] | None) -> SamplingDefaults | None:
    """The defaults a model's config holds (None: none, or none that is still valid, e.g. a
    scheduler since removed from the catalog, which then falls back to the global defaults)."""
    raw = (config or {}).get(CONFIG_KEY)
    if not isinstance(raw, dict):
        return None
    try:
        return SamplingDefaults.model_validate(raw)
    except ValidationError:
        return None


def resolve(requested: dict[str, Any], config: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, str]]:
    """The values a job uses for :data:`FIELDS`, and where each came from ("request", "model" or
    "global"). ``requested`` maps a field to the request's value, None meaning "left out"."""
    model = model_defaults(config)
    values, sources = {}, {}
    for f in FIELDS:
        if requested.get(f) is not None:
            values[f], sources[f] = requested[f], "request"
        elif model is not None and getattr(model, f) is not None:
            values[f], sources[f] = getattr(model, f), "model"
        else:
            values[f], sources[f] = GLOBAL_DEFAULTS[f], "global"
    return values, sources


def config_entry(defaults: dict[str, Any] | None) -> dict[str, Any]:
    """``{CONFIG_KEY: …}`` for a model's config (validated), or ``{}`` for none."""
    return {CONFIG_KEY: SamplingDefaults.model_validate(defaults).stored()} if defaults else {}
