"""Input images (``POST /v1/images``): an init image for image-to-image or a mask for inpainting,
checked whole (``shared.input_images``) before anything is stored, stored once under the tenant's
prefix, and referenced by id from prompt rows; :func:`prompt_image_problems` is the submit's check
that every id a request names is one of the tenant's images."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import ApiError, not_found
from api.schemas import SamplePrompt
from shared.input_images import CONTENT_TYPES, InputImageRejected, inspect_image
from shared.models import InputImage, new_id
from shared.security import TenantRef
from shared.settings import Settings
from shared.storage import Storage, input_image_key

# The prompt fields that name an input image.
IMAGE_ID_FIELDS = ("init_image", "mask_image")


def read_upload(settings: Settings, upload) -> bytes:
    """The upload's bytes, reading at most one byte past ``input_image_max_bytes`` (413 beyond)."""
    limit = settings.input_image_max_bytes
    data = upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "payload_too_large", f"the image is larger than {limit} bytes (input_image_max_bytes)")
    return data


def create_image(session: Session, settings: Settings, storage: Storage, tenant: TenantRef, data: bytes) -> InputImage:
    """Check ``data`` (format from its bytes, size and declared pixels before decoding, a full
    decode), then store it as sent and record it. A refused image stores nothing."""
    try:
        info = inspect_image(data, max_bytes=settings.input_image_max_bytes,
                             max_pixels=settings.input_image_max_pixels)
    except InputImageRejected as exc:
        code = "payload_too_large" if exc.status == 413 else "invalid_image"
        raise ApiError(exc.status, code, str(exc)) from None
    image_id = new_id()
    key = input_image_key(tenant.id, image_id)
    digest = storage.put_bytes(key, data, content_type=CONTENT_TYPES[info.format], if_none_match=True)
    image = InputImage(id=image_id, tenant_id=tenant.id, key=key, format=info.format, width=info.width,
                       height=info.height, sha256=digest, bytes=len(data))
    session.add(image)
    session.flush()
    return image


def get_image(session: Session, tenant: TenantRef, image_id: str) -> InputImage:
    """The tenant's image; another tenant's id is as unknown as a made-up one (404)."""
    image = session.get(InputImage, image_id)
    if image is None or image.tenant_id != tenant.id:
        raise not_found("image", image_id)
    return image


def prompt_image_problems(session: Session, tenant: TenantRef, prompts: Sequence[SamplePrompt]) -> list[dict]:
    """A problem (row, column) for every image id the prompts name that is not one of the tenant's
    images (another tenant's id reads as unknown); one query for the whole request."""
    wanted = {getattr(p, f) for p in prompts for f in IMAGE_ID_FIELDS} - {None}
    if not wanted:
        return []
    known = set(session.scalars(select(InputImage.id).where(InputImage.tenant_id == tenant.id,
                                                            InputImage.id.in_(wanted))))
    return [{"row": i, "column": f, "message": f"{f} {getattr(p, f)!r} is not an image of yours (POST /v1/images)"}
            for i, p in enumerate(prompts, start=1) for f in IMAGE_ID_FIELDS
            if getattr(p, f) is not None and getattr(p, f) not in known]
