"""``POST /v1/images`` (an input image: an init image for image-to-image or an inpainting mask)
and ``GET /v1/images/{id}``; the logic is ``api.services.images``."""

from __future__ import annotations

from typing import Annotated

from fastapi import File, UploadFile
from starlette.concurrency import run_in_threadpool

from api import routing
from api.deps import SessionDep, SettingsDep, TenantDep
from api.routes.jobs import ERRORS
from api.schemas import ImageOut
from api.services import images as svc
from shared.models import InputImage
from shared.storage import get_storage

router = routing.router(prefix="/v1/images", tags=["images"])


def image_out(i: InputImage) -> ImageOut:
    return ImageOut(id=i.id, width=i.width, height=i.height, format=i.format, bytes=i.bytes, sha256=i.sha256,
                    created_at=i.created_at)


def _upload(session, settings, tenant, file) -> InputImage:
    return svc.create_image(session, settings, get_storage(settings), tenant, svc.read_upload(settings, file))


@router.post("", status_code=201, response_model=ImageOut, responses=ERRORS)
async def upload_image(session: SessionDep, settings: SettingsDep, tenant: TenantDep,
                       file: Annotated[UploadFile, File(description="a PNG or JPEG (checked from its bytes)")]
                       ) -> ImageOut:
    # Decoding, storing and the insert block: off the event loop.
    return image_out(await run_in_threadpool(_upload, session, settings, tenant, file.file))


@router.get("/{image_id}", response_model=ImageOut, responses=ERRORS)
def get_image(image_id: str, session: SessionDep, tenant: TenantDep) -> ImageOut:
    return image_out(svc.get_image(session, tenant, image_id))
