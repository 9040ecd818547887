"""Input images (``POST /v1/images``): what an upload must be, checked from its bytes alone.

An init image for image-to-image or a mask for inpainting comes from a tenant, so it is treated as
hostile. The API checks it here before anything is stored, and the worker decodes it here again
(the same checks) before it reaches the model:

- the format is read from the bytes (PNG or JPEG signature, then Pillow told to try only those two
  decoders), never from the file name or the content type;
- the size is bounded before decoding: ``input_image_max_bytes`` on the upload, and the pixel
  count the header declares against ``input_image_max_pixels`` *before* any pixel is decoded. A
  decompression bomb is a few KB of PNG that declares gigapixels (a 20 000 × 20 000 PNG of one
  colour compresses to ~1 MB and would decode to 1.2 GB of RGB); Pillow's own guard only trips at
  2 × 89 M pixels, far above what a job can use (``max_image_size`` 1024);
- the whole image is then decoded once (a truncated or corrupt file fails here, not in a job), with
  Pillow's text-chunk limit in force.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

FORMATS = ("PNG", "JPEG")
_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}
CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg"}


class InputImageRejected(ValueError):
    """Not an acceptable input image; ``status`` 413 when it is too large, else 422."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImageInfo:
    format: str  # PNG or JPEG
    width: int
    height: int


def sniff_format(data: bytes) -> str:
    """PNG or JPEG, from the leading bytes; anything else is refused."""
    for sig, fmt in _SIGNATURES.items():
        if data.startswith(sig):
            return fmt
    raise InputImageRejected(f"the file is not a PNG or JPEG image (by its content, whatever its name); "
                             f"valid formats: {', '.join(FORMATS)}")


def open_image(data: bytes, *, max_bytes: int, max_pixels: int):
    """The image decoded whole (a ``PIL.Image``), after every check in the module docstring."""
    from PIL import Image

    if len(data) > max_bytes:
        raise InputImageRejected(f"the image is {len(data)} bytes; the limit is {max_bytes}", 413)
    if not data:
        raise InputImageRejected("the file is empty")
    fmt = sniff_format(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = img.size
            if width < 1 or height < 1:
                raise InputImageRejected(f"the image declares a size of {width}x{height}")
            if width * height > max_pixels:
                raise InputImageRejected(f"the image declares {width}x{height} = {width * height} pixels; the limit "
                                         f"is {max_pixels}", 413)
            img.load()
    except InputImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputImageRejected(f"the image declares too many pixels: {exc}", 413) from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for a corrupt file
        raise InputImageRejected(f"the {fmt} image could not be decoded: {exc}") from None
    if img.format != fmt:
        raise InputImageRejected(f"the file starts like a {fmt} but decodes as {img.format}")
    return img


def inspect_image(data: bytes, *, max_bytes: int, max_pixels: int) -> ImageInfo:
    """Format and size of an acceptable input image (InputImageRejected otherwise)."""
    img = open_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    return ImageInfo(img.format, img.width, img.height)
