"""The demo's contact sheet: one labelled row per prompt, white gaps between the images."""

from __future__ import annotations

import io

from PIL import Image

from ldmq.demo import DIGITS, contact_sheet


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def test_rows_are_labelled_and_images_separated(tmp_path):
    rows = [[_png((0, 0, 0))] * 3 for _ in DIGITS]
    sheet = Image.open(contact_sheet(rows, tmp_path / "s.png", labels=DIGITS, scale=2, gap=4, label_width=40))
    px = sheet.load()
    assert sheet.size == (40 + 4 + 3 * (16 + 4), 4 + 10 * (16 + 4))
    label_strip = [px[x, y] for x in range(40) for y in range(4, 20)]
    assert any(p != (255, 255, 255) for p in label_strip)  # "zero" is drawn there
    first_image_x = 40 + 4
    assert px[first_image_x, 4] == (0, 0, 0) and px[first_image_x + 16, 4] == (255, 255, 255)  # a gap after it
    assert px[first_image_x, 4 + 16] == (255, 255, 255)  # and between the rows


def test_without_labels_there_is_no_label_strip(tmp_path):
    sheet = Image.open(contact_sheet([[_png((0, 0, 0))]], tmp_path / "s.png", scale=1, gap=2))
    assert sheet.size == (2 + 8 + 2, 2 + 8 + 2)
