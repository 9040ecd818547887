"""A sample run's input images (image-to-image init images and inpainting masks): fetched from
storage and decoded once per run, by id, for every job packed into it.

An image is looked up by id and must belong to the job's tenant (the submit checked it; checked
again here, so a row can never reach another tenant's image). Its bytes are read with their
SHA-256 verified and decoded by ``shared.input_images`` with the upload's own checks (format from
the bytes, size, declared pixels before decoding). Kept decoded, least recently used dropped past
``CAPACITY`` (at most 64 × 2048² px × 3 B ≈ 800 MB with the default pixel cap; a run's batches come
in row order, so a row's image is fetched once).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from shared.db import session_scope
from shared.input_images import InputImageRejected, open_image
from shared.models import InputImage
from shared.settings import Settings
from shared.storage import ObjectNotFound, get_storage
from worker.jobs.base import JobError

CAPACITY = 64


class InputImages:
    """Decoded input images by id; thread-safe (the model streams share it)."""

    def __init__(self, settings: Settings, capacity: int = CAPACITY):
        self.settings, self.capacity = settings, capacity
        self._items: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()
        self.fetches = 0

    def get(self, tenant_id: str, image_id: str):
        """The image ``image_id`` of ``tenant_id`` (a ``PIL.Image``); JobError if it is not one of the tenant's."""
        with self._lock:
            if image_id in self._items:
                self._items.move_to_end(image_id)
                return self._items[image_id]
            img = self._fetch(tenant_id, image_id)
            self._items[image_id] = img
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
            return img

    def _fetch(self, tenant_id: str, image_id: str):
        with session_scope(self.settings) as s:
            row = s.get(InputImage, image_id)
            key = row.key if row is not None and row.tenant_id == tenant_id else None
        if key is None:
            raise JobError("input_image_not_found", f"input image {image_id!r} was not found")
        try:
            data = get_storage(self.settings).get_bytes(key)
        except ObjectNotFound:
            raise JobError("input_image_not_found", f"input image {image_id!r} is no longer stored") from None
        try:
            img = open_image(data, max_bytes=self.settings.input_image_max_bytes,
                             max_pixels=self.settings.input_image_max_pixels)
        except InputImageRejected as exc:
            raise JobError("invalid_input_image", f"input image {image_id!r}: {exc}") from None
        self.fetches += 1
        return img
