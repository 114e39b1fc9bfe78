"""Readers for public LLM inference traces: when requests came and how many tokens they had.

Four formats, each read into the same :class:`Trace` of :class:`TraceRecord`::

    azure             Azure LLM inference trace CSV: TIMESTAMP, ContextTokens, GeneratedTokens
                      (TIMESTAMP like ``2023-11-16 18:15:46.6805900``, seven fraction digits)
    mooncake          Mooncake JSONL: {"timestamp": ms, "input_length", "output_length", "hash_ids"}
                      (one hash id per 512-token prefix block; equal ids = shared prefix content)
    sharegpt          ShareGPT conversations (JSON list); lengths come from a tokenizer you pass
    sharegpt_lengths  sarathi-serve's ShareGPT lengths CSV: num_prefill_tokens, num_decode_tokens, ...

Invariants of every record: ``input_tokens >= 1``, ``output_tokens >= 1``; ``at`` is seconds
after the trace's *first record* (so the first is 0.0; it may be negative for a later row of an
unsorted file) or ``None`` for formats without timestamps. Records keep the file's order.
Pure Python (no torch). Small samples of each format ship in ``hetpd/bench/samples``.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Literal, get_args

TraceFormat = Literal["azure", "mooncake", "sharegpt", "sharegpt_lengths"]
TRACE_FORMATS: tuple[TraceFormat, ...] = get_args(TraceFormat)
# Formats whose records carry no arrival times.
UNTIMED_FORMATS: tuple[TraceFormat, ...] = ("sharegpt", "sharegpt_lengths")

SAMPLES: dict[TraceFormat, str] = {
    "azure": "azure_conv_sample.csv",
    "mooncake": "mooncake_sample.jsonl",
    "sharegpt": "sharegpt_sample.json",
    "sharegpt_lengths": "sharegpt_lengths_sample.csv",
}

_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant", "chatgpt")
_JSON_WS = re.compile(r"[ \t\n\r]*")


class TraceError(ValueError):
    """A trace that cannot be read; the message names the file, the line and what is wrong."""


@dataclass(frozen=True)
class TraceRecord:
    """One request of a trace. ``prefix_ids``: ids of its 512-token prefix blocks (Mooncake)."""

    at: float | None
    input_tokens: int
    output_tokens: int
    prefix_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Trace:
    """What a reader found: the usable records, where from, and how many entries it skipped
    (ShareGPT conversations without a human turn answered by a gpt turn, or an empty prompt)."""

    records: tuple[TraceRecord, ...]
    source: str
    skipped: int

    @property
    def timed(self) -> bool:
        """Every record has an arrival time (False for an empty trace)."""
        return bool(self.records) and all(r.at is not None for r in self.records)


def sample_path(format: TraceFormat) -> Path:
    """The shipped sample of ``format`` (first 200 rows of the public trace, or hand-written)."""
    if format not in SAMPLES:
        raise TraceError(f"format: no sample for {format!r}; choose one of {TRACE_FORMATS}")
    return Path(str(resources.files("hetpd.bench").joinpath("samples", SAMPLES[format])))


def read_trace(path: str | Path, format: str | None = None,
               count_tokens: Callable[[str], int] | None = None, limit: int | None = None) -> Trace:
    """Read ``path`` as ``format`` (None: sniffed from the first line, then the suffix).

    ``limit``: stop after that many records. ``count_tokens`` is needed for "sharegpt" only.
    """
    path = Path(path)
    if limit is not None and limit < 0:
        raise TraceError(f"limit must be >= 0 or None, got {limit}")
    fmt = detect_format(path) if format is None else _known_format(format)
    if fmt == "azure":
        return read_azure(path, limit)
    if fmt == "mooncake":
        return read_mooncake(path, limit)
    if fmt == "sharegpt_lengths":
        return read_sharegpt_lengths(path, limit)
    if count_tokens is None:
        raise TraceError(f"{path}: a ShareGPT trace holds text, not lengths: pass count_tokens "
                         "(e.g. lambda s: len(tokenizer.encode(s)))")
    return read_sharegpt(path, count_tokens, limit)


def _known_format(format: str) -> TraceFormat:
    for known in TRACE_FORMATS:
        if format == known:
            return known
    raise TraceError(f"format {format!r} is not a trace format; choose one of {TRACE_FORMATS}")


def detect_format(path: str | Path) -> TraceFormat:
    """The format of ``path``, from its first non-blank line, else from its suffix."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8-sig") as f:
            first = next((line.strip() for line in f if line.strip()), "")
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read the trace: {exc}") from None
    columns = {c.strip() for c in first.split(",")}
    if first.startswith("{"):
        return "mooncake"  # one JSON object per line; a ShareGPT file is one JSON list
    if first.startswith("["):
        return "sharegpt"
    if "TIMESTAMP" in columns:
        return "azure"
    if "num_prefill_tokens" in columns:
        return "sharegpt_lengths"
    by_suffix: dict[str, TraceFormat] = {".jsonl": "mooncake", ".json": "sharegpt"}
    if path.suffix.lower() in by_suffix and not first:
        return by_suffix[path.suffix.lower()]
    raise TraceError(f"{path}:1: cannot tell the trace format from the first line {first[:80]!r}; "
                     f"pass format= one of {TRACE_FORMATS}")


# ---------------------------------------------------------------------------------------- CSV
def _csv_rows(path: Path, required: tuple[str, ...], what: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {column: value}) of each non-blank data row; the header must name ``required``."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            names = [h.strip() for h in header or []]
            missing = [c for c in required if c not in names]
            if missing:
                raise TraceError(f"{path}:1: missing column(s) {missing}; {what} has columns {list(required)}")
            for row in reader:
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(names):
                    raise TraceError(f"{path}:{reader.line_num}: expected {len(names)} fields, got {len(row)}")
                yield reader.line_num, dict(zip(names, row, strict=True))
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read the trace: {exc}") from None


def _positive(text: str, column: str, where: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise TraceError(f"{where}: {column!r} must be a positive integer, got {text.strip()!r}")
    return value


def _azure_time(text: str, where: str) -> tuple[datetime, float]:
    """Whole seconds as a datetime and the fraction apart: the trace has 7 fraction digits (100 ns),
    more than datetime keeps, and subtracting the parts keeps them."""
    main, _, fraction = text.strip().replace("T", " ").partition(".")
    try:
        whole = datetime.strptime(main, "%Y-%m-%d %H:%M:%S")
        if fraction and not fraction.isdigit():
            raise ValueError(fraction)
    except ValueError:
        raise TraceError(f"{where}: 'TIMESTAMP' must look like '2023-11-16 18:15:46.6805900', "
                         f"got {text.strip()!r}") from None
    return whole, float(f"0.{fraction}") if fraction else 0.0


def read_azure(path: str | Path, limit: int | None = None) -> Trace:
    path = Path(path)
    records: list[TraceRecord] = []
    first: tuple[datetime, float] | None = None
    for line, row in _csv_rows(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"), "an Azure LLM trace"):
        if limit is not None and len(records) >= limit:
            break
        where = f"{path}:{line}"
        whole, fraction = _azure_time(row["TIMESTAMP"], where)
        first = first or (whole, fraction)
        at = (whole - first[0]).total_seconds() + (fraction - first[1])
        records.append(TraceRecord(at, _positive(row["ContextTokens"], "ContextTokens", where),
                                   _positive(row["GeneratedTokens"], "GeneratedTokens", where)))
    return Trace(tuple(records), str(path), 0)


def read_sharegpt_lengths(path: str | Path, limit: int | None = None) -> Trace:
    path = Path(path)
    records: list[TraceRecord] = []
    columns = ("num_prefill_tokens", "num_decode_tokens")
    for line, row in _csv_rows(path, columns, "a ShareGPT lengths CSV"):
        if limit is not None and len(records) >= limit:
            break
        where = f"{path}:{line}"
        records.append(TraceRecord(None, _positive(row[columns[0]], columns[0], where),
                                   _positive(row[columns[1]], columns[1], where)))
    return Trace(tuple(records), str(path), 0)


# -------------------------------------------------------------------------------------- JSONL
def _json_int(obj: dict[str, object], key: str, where: str, minimum: int) -> int:
    value = obj.get(key)
    # bool is an int to Python, never a length to a trace.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive integer" if minimum == 1 else "a non-negative integer"
        raise TraceError(f"{where}: {key!r} must be {kind}, got {value!r}")
    return value


def read_mooncake(path: str | Path, limit: int | None = None) -> Trace:
    path = Path(path)
    records: list[TraceRecord] = []
    first_ms: float | None = None
    try:
        with path.open(encoding="utf-8-sig") as f:
            for line_no, line in enumerate(f, start=1):
                if limit is not None and len(records) >= limit:
                    break
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TraceError(f"{where}: not valid JSON: {exc.msg}") from None
                if not isinstance(obj, dict):
                    raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                stamp = obj.get("timestamp")
                if not isinstance(stamp, int | float) or isinstance(stamp, bool) or stamp < 0:
                    raise TraceError(f"{where}: 'timestamp' must be a non-negative number of ms, got {stamp!r}")
                hash_ids = obj.get("hash_ids", [])
                if not isinstance(hash_ids, list) or not all(
                        isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in hash_ids):
                    raise TraceError(f"{where}: 'hash_ids' must be a list of non-negative integers")
                first_ms = stamp if first_ms is None else first_ms
                records.append(TraceRecord((stamp - first_ms) / 1000.0, _json_int(obj, "input_length", where, 1),
                                           _json_int(obj, "output_length", where, 1), tuple(hash_ids)))
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read the trace: {exc}") from None
    return Trace(tuple(records), str(path), 0)


# ----------------------------------------------------------------------------------- ShareGPT
def _skip_ws(text: str, pos: int) -> int:
    match = _JSON_WS.match(text, pos)  # always matches (maybe the empty string)
    return match.end() if match else pos


def _json_list_items(text: str, path: Path) -> Iterator[tuple[int, object]]:
    """(line, item) for each item of a top-level JSON list, so errors can name the item's line
    (``json.loads`` of the whole file would lose every position)."""
    decoder = json.JSONDecoder()
    line, counted = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    pos = _skip_ws(text, 0)
    if not text.startswith("[", pos):
        raise TraceError(f"{path}:{line_at(pos)}: a ShareGPT file is a JSON list of conversations")
    pos = _skip_ws(text, pos + 1)
    if text.startswith("]", pos):
        return
    while True:
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
        yield line_at(pos), item
        pos = _skip_ws(text, end)
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
        elif text.startswith("]", pos):
            return
        else:
            raise TraceError(f"{path}:{line_at(pos)}: not valid JSON: expected ',' or ']' after a conversation")


def _turns(item: object, where: str) -> list[tuple[str, str]]:
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
        raise TraceError(f"{where}: expected {{\"conversations\": [...]}}, got {str(item)[:60]!r}")
    turns: list[tuple[str, str]] = []
    for k, turn in enumerate(item["conversations"]):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) \
                or not isinstance(turn.get("value"), str):
            raise TraceError(f"{where}: turn {k} must be {{\"from\": str, \"value\": str}}, got {str(turn)[:60]!r}")
        turns.append((turn["from"], turn["value"]))
    return turns


def read_sharegpt(path: str | Path, count_tokens: Callable[[str], int], limit: int | None = None) -> Trace:
    """The first human turn is the prompt, the gpt turn right after it the output. Conversations
    with fewer than two turns, no such pair, or a prompt/answer of zero tokens are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read the trace: {exc}") from None
    records: list[TraceRecord] = []
    skipped = 0
    for index, (line, item) in enumerate(_json_list_items(text, path)):
        if limit is not None and len(records) >= limit:
            break
        turns = _turns(item, f"{path}:{line}: conversation {index}")
        human = next((k for k, (who, _) in enumerate(turns) if who in _HUMAN), None)
        if len(turns) < 2 or human is None or human + 1 >= len(turns) or turns[human + 1][0] not in _GPT:
            skipped += 1
            continue
        prompt, answer = count_tokens(turns[human][1]), count_tokens(turns[human + 1][1])
        if prompt < 1 or answer < 1:
            skipped += 1
            continue
        records.append(TraceRecord(None, prompt, answer))
    return Trace(tuple(records), str(path), skipped)
