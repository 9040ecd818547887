"""Bearer API keys: parse the header, and remember valid keys for a few seconds.

Every authenticated request used to cost a database round trip before any work; at hundreds of
submits a second that lookup was a quarter of the API's time. A key found valid is kept for
``Settings.auth_cache_s`` (5 s by default), keyed by its SHA-256 so the process never holds a key
in the clear; revoking a key therefore takes effect within that time. Failures are not cached: a
key created a moment ago works at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from api.errors import ApiError
from shared.security import TenantRef, hash_key


def bearer_token(authorization: str) -> str:
    """The key in ``Authorization: Bearer <key>``, or a 401 that says what is missing."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "missing bearer API key (Authorization: Bearer <key>)",
                       headers={"WWW-Authenticate": "Bearer"})
    return token.strip()


class KeyCache:
    """Valid keys → their tenant, for ``ttl_s`` seconds, at most ``max_entries`` (least recently
    used dropped first). Used from the event loop only, so it needs no lock."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000, clock=time.monotonic):
        self.ttl_s, self.max_entries, self._clock = ttl_s, max_entries, clock
        self._entries: OrderedDict[str, tuple[TenantRef, float]] = OrderedDict()

    def get(self, key: str) -> TenantRef | None:
        if self.ttl_s <= 0:
            return None
        digest = hash_key(key)
        found = self._entries.get(digest)
        if found is None:
            return None
        tenant, expires = found
        if self._clock() >= expires:
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return tenant

    def put(self, key: str, tenant: TenantRef) -> None:
        if self.ttl_s <= 0:
            return
        digest = hash_key(key)
        self._entries[digest] = (tenant, self._clock() + self.ttl_s)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
