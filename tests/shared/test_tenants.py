"""shared.tenants: parsing and validating the operator's values, and setting them (all or nothing)."""

from __future__ import annotations

import pytest

from shared import tenants
from shared.db import session_scope
from shared.registry import TenantNotFound
from shared.settings import Settings
from shared.tenants import InvalidTenantSettings


def test_parse_values_and_the_words_that_clear_them():
    assert tenants.parse_value("weight", "2.5") == 2.5
    assert tenants.parse_value("max_queued_images", "0") == 0  # zero is a limit: no new work
    assert tenants.parse_value("max_running", "none") is None
    assert tenants.parse_value("rate_per_s", "0") is None  # a zero rate clears, it does not block
    assert tenants.parse_value("rate_burst", "Unlimited") is None
    with pytest.raises(InvalidTenantSettings, match="max_running: '1.5' is not a whole number"):
        tenants.parse_value("max_running", "1.5")
    with pytest.raises(InvalidTenantSettings, match="unknown setting 'rate'; valid: weight, max_running"):
        tenants.parse_value("rate", "1")


def test_validate_lists_every_problem():
    with pytest.raises(InvalidTenantSettings) as exc:
        tenants.validate({"weight": 0, "max_running": -1, "max_queued_images": 2**40, "rate_per_s": float("inf"),
                          "rate_burst": 0, "colour": "red"})
    text = " | ".join(exc.value.problems)
    assert len(exc.value.problems) == 6
    for needle in ("weight must be a number > 0", "max_running must be a whole number from 0",
                   "max_queued_images must be a whole number", "rate_per_s must be a number > 0",
                   "rate_burst must be a whole number from 1", "unknown setting 'colour'"):
        assert needle in text
    tenants.validate({"weight": 3, "max_running": 0, "rate_per_s": 0.5, "rate_burst": None})


def test_set_get_list_and_unknown_tenant(settings, make_tenant):
    tid, _ = make_tenant("acme-" + settings.storage_url[-8:])
    name = "acme-" + settings.storage_url[-8:]
    with session_scope(settings) as s:
        got = tenants.set_tenant_settings(s, name, {"weight": 2.0, "max_queued_images": 50, "rate_per_s": 4.0})
    assert (got.id, got.weight, got.max_queued_images, got.rate_per_s, got.max_running) == (tid, 2.0, 50, 4.0, None)
    with session_scope(settings) as s:  # all or nothing: one bad value changes nothing
        with pytest.raises(InvalidTenantSettings):
            tenants.set_tenant_settings(s, name, {"weight": 9.0, "rate_burst": 0})
    with session_scope(settings) as s:
        assert tenants.get_tenant_settings(s, name).weight == 2.0
        cleared = tenants.set_tenant_settings(s, name, {"weight": None, "rate_per_s": None})
    assert (cleared.weight, cleared.rate_per_s, cleared.max_queued_images) == (1.0, None, 50)
    with session_scope(settings) as s:
        assert name in [t.name for t in tenants.list_tenant_settings(s)]
        with pytest.raises(TenantNotFound, match="no tenant named 'nobody-here'"):
            tenants.set_tenant_settings(s, "nobody-here", {"weight": 2.0})


def test_effective_rate_falls_back_to_the_deployment():
    none, default = Settings(), Settings(rate_per_s=2.5)
    assert tenants.effective_rate(None, None, none) is None
    assert tenants.effective_rate(None, None, default) == (2.5, 3)  # burst: one second's worth, rounded up
    assert tenants.effective_rate(10.0, None, Settings(rate_per_s=1, rate_burst=7)) == (10.0, 7)
    assert tenants.effective_rate(0.1, 5, default) == (0.1, 5)
    assert tenants.effective_rate(0.1, None, none) == (0.1, 1)


def test_parse_values_reports_every_problem_at_once():
    with pytest.raises(InvalidTenantSettings) as exc:
        tenants.parse_values({"weight": "0", "max_running": "-1", "rate_burst": "x"})
    assert len(exc.value.problems) == 3
    assert tenants.parse_values({"weight": "2", "rate_per_s": "0"}) == {"weight": 2.0, "rate_per_s": None}
