"""Input images are checked from their bytes: format, size, declared pixels before decoding."""

import io
import struct
import zlib

import pytest
from PIL import Image

from shared.input_images import InputImageRejected, inspect_image, open_image

LIMITS = dict(max_bytes=1 << 20, max_pixels=256 * 256)


def encoded(fmt: str, size=(32, 24), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, "red" if mode == "RGB" else 255).save(buf, format=fmt)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG header that declares width x height (one IDAT of a single row): a bomb's first bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (1 + 3 * width))) \
        + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_png_and_jpeg_pass_with_their_size(fmt):
    info = inspect_image(encoded(fmt), **LIMITS)
    assert (info.format, info.width, info.height) == (fmt, 32, 24)


def test_the_format_comes_from_the_bytes_not_the_name():
    with pytest.raises(InputImageRejected, match="not a PNG or JPEG") as exc:
        inspect_image(encoded("GIF"), **LIMITS)  # whatever it is called
    assert exc.value.status == 422
    with pytest.raises(InputImageRejected, match="not a PNG or JPEG"):
        inspect_image(b"a,b\n1,2\n", **LIMITS)


def test_too_many_bytes_is_413():
    with pytest.raises(InputImageRejected, match="bytes; the limit") as exc:
        inspect_image(encoded("PNG"), max_bytes=20, max_pixels=LIMITS["max_pixels"])
    assert exc.value.status == 413


def test_a_decompression_bomb_is_refused_by_its_header_before_decoding():
    bomb = png_declaring(50_000, 50_000)  # 2.5 G pixels declared, in under 200 KB
    assert len(bomb) < 200_000
    with pytest.raises(InputImageRejected, match="pixels") as exc:
        inspect_image(bomb, max_bytes=1 << 20, max_pixels=10**9)  # past Pillow's own guard too
    assert exc.value.status == 413
    with pytest.raises(InputImageRejected, match="limit is 65536") as exc:
        inspect_image(png_declaring(300, 300), **LIMITS)  # under Pillow's guard, over ours
    assert exc.value.status == 413


def test_a_truncated_image_is_422():
    data = encoded("PNG", size=(64, 64))
    with pytest.raises(InputImageRejected, match="could not be decoded") as exc:
        inspect_image(data[: len(data) // 2], **LIMITS)
    assert exc.value.status == 422


def test_open_image_gives_the_decoded_pixels():
    img = open_image(encoded("PNG", mode="L"), **LIMITS)
    assert img.mode == "L" and img.getpixel((0, 0)) == 255
