"""Parse and validate a CSV of prompts whole, before anything is stored.

Every bad cell is reported with its 1-based data row and its column, not just the first one.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass, field

from pydantic import ValidationError

from api.schemas import IMAGE_FIELDS_NEEDING_INIT, SEED_MAX, SamplePrompt

REQUIRED = ("prompt",)
# init_image / mask_image: input image ids (POST /v1/images); whether they are the tenant's is
# checked by the submit (api.services.images), which names the row and column too.
OPTIONAL = ("negative_prompt", "seed", "num_images", "guidance_scale", "steps", "init_image", "strength", "mask_image")
COLUMNS = REQUIRED + OPTIONAL


@dataclass(frozen=True)
class CsvLimits:
    max_rows: int = 10_000
    max_prompt_chars: int = 1000
    max_images_per_row: int = 16
    max_steps: int = 1000


@dataclass
class CsvError(Exception):
    message: str
    details: list[dict] = field(default_factory=list)

    def __str__(self) -> str:
        return self.message


def _problem(row: int | None, column: str | None, message: str) -> dict:
    out: dict = {"message": message}
    if row is not None:
        out["row"] = row
    if column is not None:
        out["column"] = column
    return out


def _int(value: str, *, lo: int, hi: int) -> tuple[int | None, str | None]:
    try:
        n = int(value.strip())
    except ValueError:
        return None, f"{value!r} is not an integer"
    if n < lo or n > hi:
        return None, f"{n} is out of range {lo}..{hi}"
    return n, None


def parse_prompts_csv(data: bytes, limits: CsvLimits = CsvLimits()) -> list[SamplePrompt]:
    """Return the rows as SamplePrompt objects, or raise CsvError listing every problem."""
    reader = csv.reader(io.StringIO(_decode(data), newline=""))
    header = _read_header(reader)
    rows, problems, n = _read_rows(reader, header, limits)
    if n == 0 and not problems:
        raise CsvError("the CSV has a header but no rows", [_problem(None, None, "no data rows")])
    if problems:
        raise CsvError(f"{len(problems)} problem(s) in the CSV", problems)
    return rows


def _decode(data: bytes) -> str:
    """The file as text (UTF-8, a BOM allowed); an empty file or a bad byte is a CsvError that
    names the data row holding it."""
    if not data or not data.strip():
        raise CsvError("the CSV file is empty", [_problem(None, None, "the file has no header row")])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n")  # 0 = header
        raise CsvError("the CSV file is not valid UTF-8",
                       [_problem(line if line > 0 else None, None,
                                 f"byte 0x{data[exc.start]:02x} at offset {exc.start} is not UTF-8")]) from None


def _read_header(reader) -> list[str]:
    """The column names, stripped; a CsvError lists every unknown, repeated or missing column."""
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as exc:
        raise CsvError("the CSV file has no header row", [_problem(None, None, str(exc) or "no header")]) from None
    header = [h.strip() for h in header]
    problems: list[dict] = []
    unknown = list(dict.fromkeys(h for h in header if h not in COLUMNS))
    for h in unknown:
        problems.append(_problem(None, h, f"unknown column {h!r}; valid columns: {', '.join(COLUMNS)}"))
    counts = Counter(header)  # one pass: a header of a million columns costs a million steps, not 10^12
    for h in sorted(h for h, c in counts.items() if c > 1):
        problems.append(_problem(None, h, f"column {h!r} appears more than once"))
    if "prompt" not in header:
        problems.append(_problem(None, "prompt", "the required column 'prompt' is missing"))
    if problems:
        raise CsvError("the CSV header is invalid", problems)
    return header


def _read_rows(reader, header: list[str], limits: CsvLimits) -> tuple[list[SamplePrompt], list[dict], int]:
    """Every data row: (the good rows, the problems of all rows, how many rows were read).

    More than ``max_rows`` rows stops at once (CsvError); malformed CSV (an unclosed quote) ends
    the reading with a problem on the row after the last one read."""
    rows: list[SamplePrompt] = []
    problems: list[dict] = []
    n = 0
    try:
        for n, cells in enumerate(reader, start=1):
            if n > limits.max_rows:
                raise CsvError(f"the CSV has more than {limits.max_rows} rows",
                               [_problem(n, None, f"row limit is {limits.max_rows}")])
            prompt, row_problems = _read_row(n, cells, header, limits)
            problems += row_problems
            if prompt is not None:
                rows.append(prompt)
    except csv.Error as exc:
        problems.append(_problem(n + 1, None, f"malformed CSV: {exc}"))
    return rows, problems, n


def _read_row(n: int, cells: list[str], header: list[str], limits: CsvLimits
              ) -> tuple[SamplePrompt | None, list[dict]]:
    """Data row ``n`` as a SamplePrompt, or None and the row's problems (every bad cell)."""
    if not any(c.strip() for c in cells):
        return None, [_problem(n, None, "the row is empty")]
    if len(cells) != len(header):
        return None, [_problem(n, None, f"expected {len(header)} cells, found {len(cells)}")]
    rec = dict(zip(header, cells))
    values, problems = _text_cells(n, rec, limits)
    number_values, number_problems = _number_cells(n, rec, limits)
    values.update(number_values)
    problems += number_problems
    image_values, image_problems = _image_cells(n, rec)
    values.update(image_values)
    problems += image_problems
    if "prompt" not in values or problems:
        return None, problems
    try:
        return SamplePrompt(**values), []
    except ValidationError as exc:
        return None, [_problem(n, str(err["loc"][0]) if err.get("loc") else None, err["msg"])
                      for err in exc.errors()]


def _text_cells(n: int, rec: dict[str, str], limits: CsvLimits) -> tuple[dict, list[dict]]:
    """``prompt`` (required) and ``negative_prompt`` of row ``n``: (values, problems)."""
    values: dict = {}
    problems: list[dict] = []
    prompt = rec["prompt"]
    if not prompt.strip():
        problems.append(_problem(n, "prompt", "prompt is missing"))
    elif len(prompt) > limits.max_prompt_chars:
        problems.append(_problem(n, "prompt", f"prompt has {len(prompt)} characters; the limit is {limits.max_prompt_chars}"))
    else:
        values["prompt"] = prompt
    neg = rec.get("negative_prompt", "")
    if neg:
        if len(neg) > limits.max_prompt_chars:
            problems.append(_problem(n, "negative_prompt", f"negative_prompt has {len(neg)} characters; the limit is {limits.max_prompt_chars}"))
        else:
            values["negative_prompt"] = neg
    return values, problems


def _number_cells(n: int, rec: dict[str, str], limits: CsvLimits) -> tuple[dict, list[dict]]:
    """The optional numbers of row ``n`` (``seed``, ``num_images``, ``steps``, ``guidance_scale``),
    blank cells left out: (values, problems)."""
    values: dict = {}
    problems: list[dict] = []
    for col, lo, hi in (("seed", 0, SEED_MAX), ("num_images", 1, limits.max_images_per_row), ("steps", 1, limits.max_steps)):
        raw = rec.get(col, "")
        if raw.strip():
            v, err = _int(raw, lo=lo, hi=hi)
            if err:
                problems.append(_problem(n, col, f"{col}: {err}"))
            else:
                values[col] = v
    raw = rec.get("guidance_scale", "")
    if raw.strip():
        try:
            g = float(raw)
            if not (0 <= g <= 50):
                raise ValueError
            values["guidance_scale"] = g
        except ValueError:
            problems.append(_problem(n, "guidance_scale", f"guidance_scale: {raw!r} is not a number in 0..50"))
    return values, problems


def _image_cells(n: int, rec: dict[str, str]) -> tuple[dict, list[dict]]:
    """``init_image``, ``strength`` (0 < s ≤ 1) and ``mask_image`` of row ``n``, blank cells left
    out; strength or mask_image without init_image is a problem of their column."""
    values: dict = {}
    problems: list[dict] = []
    for col in ("init_image", "mask_image"):
        raw = rec.get(col, "").strip()
        if raw:
            if len(raw) > 64:
                problems.append(_problem(n, col, f"{col}: an image id is at most 64 characters"))
            else:
                values[col] = raw
    raw = rec.get("strength", "")
    if raw.strip():
        try:
            s = float(raw)
            if not (0 < s <= 1):
                raise ValueError
            values["strength"] = s
        except ValueError:
            problems.append(_problem(n, "strength", f"strength: {raw!r} is not a number in (0, 1]"))
    if not rec.get("init_image", "").strip():
        for col in IMAGE_FIELDS_NEEDING_INIT:
            if rec.get(col, "").strip():
                problems.append(_problem(n, col, f"{col} needs init_image (an input image id from POST /v1/images)"))
    return values, problems
