"""The API key cache: time-to-live, size bound, and no key kept in the clear."""

import pytest

from api.auth import KeyCache, bearer_token
from api.errors import ApiError
from shared.security import TenantRef

T1, T2 = TenantRef(id="t1", name="one"), TenantRef(id="t2", name="two")


def test_entries_expire_after_the_ttl():
    now = [0.0]
    cache = KeyCache(5.0, clock=lambda: now[0])
    cache.put("ldmq_a_secret", T1)
    now[0] = 4.9
    assert cache.get("ldmq_a_secret") == T1
    now[0] = 5.0
    assert cache.get("ldmq_a_secret") is None
    assert len(cache) == 0


def test_least_recently_used_entry_goes_first():
    cache = KeyCache(60.0, max_entries=2)
    cache.put("k1", T1)
    cache.put("k2", T2)
    assert cache.get("k1") == T1  # k1 is now the most recent
    cache.put("k3", T1)
    assert cache.get("k2") is None and cache.get("k1") == T1 and cache.get("k3") == T1


def test_zero_ttl_disables_the_cache():
    cache = KeyCache(0)
    cache.put("k1", T1)
    assert cache.get("k1") is None and len(cache) == 0


def test_keys_are_held_only_as_digests():
    cache = KeyCache(60.0)
    cache.put("ldmq_abc_topsecret", T1)
    assert all("topsecret" not in k for k in cache._entries)  # hex digests (shared.security.hash_key)


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer   ", "Basic abc", "token"])
def test_bearer_token_refuses_missing_or_other_schemes(header):
    with pytest.raises(ApiError) as exc:
        bearer_token(header)
    assert exc.value.status == 401


def test_bearer_token_strips_spaces():
    assert bearer_token("bearer  ldmq_x_y ") == "ldmq_x_y"
