"""Parse and validate a CSV of prompts whole, before anything is stored.

Every bad cell is reported with its 1-based data row and its column, not just the first one.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

from pydantic import ValidationError

from api.schemas import SEED_MAX, SamplePrompt

REQUIRED = ("prompt",)
OPTIONAL = ("negative_prompt", "seed", "num_images", "guidance_scale", "steps")
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
    if not data or not data.strip():
        raise CsvError("the CSV file is empty", [_problem(None, None, "the file has no header row")])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # Find the data row that holds the bad byte, so the user can fix it.
        line = data[: exc.start].count(b"\n")  # 0 = header
        raise CsvError("the CSV file is not valid UTF-8",
                       [_problem(line if line > 0 else None, None,
                                 f"byte 0x{data[exc.start]:02x} at offset {exc.start} is not UTF-8")]) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as exc:
        raise CsvError("the CSV file has no header row", [_problem(None, None, str(exc) or "no header")]) from None
    header = [h.strip() for h in header]
    problems: list[dict] = []
    unknown = [h for h in header if h not in COLUMNS]
    for h in unknown:
        problems.append(_problem(None, h, f"unknown column {h!r}; valid columns: {', '.join(COLUMNS)}"))
    dupes = {h for h in header if header.count(h) > 1}
    for h in sorted(dupes):
        problems.append(_problem(None, h, f"column {h!r} appears more than once"))
    if "prompt" not in header:
        problems.append(_problem(None, "prompt", "the required column 'prompt' is missing"))
    if problems:
        raise CsvError("the CSV header is invalid", problems)

    rows: list[SamplePrompt] = []
    n = 0
    try:
        for n, cells in enumerate(reader, start=1):
            if n > limits.max_rows:
                raise CsvError(f"the CSV has more than {limits.max_rows} rows",
                               [_problem(n, None, f"row limit is {limits.max_rows}")])
            if not any(c.strip() for c in cells):
                problems.append(_problem(n, None, "the row is empty"))
                continue
            if len(cells) != len(header):
                problems.append(_problem(n, None, f"expected {len(header)} cells, found {len(cells)}"))
                continue
            rec = dict(zip(header, cells))
            values: dict = {}
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
            if "prompt" in values and len([p for p in problems if p.get("row") == n]) == 0:
                try:
                    rows.append(SamplePrompt(**values))
                except ValidationError as exc:
                    for err in exc.errors():
                        col = str(err["loc"][0]) if err.get("loc") else None
                        problems.append(_problem(n, col, err["msg"]))
    except csv.Error as exc:
        problems.append(_problem(n + 1, None, f"malformed CSV: {exc}"))
    if n == 0 and not problems:
        raise CsvError("the CSV has a header but no rows", [_problem(None, None, "no data rows")])
    if problems:
        raise CsvError(f"{len(problems)} problem(s) in the CSV", problems)
    return rows
