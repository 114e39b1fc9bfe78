"""Trace readers: the shipped samples parse to what the files say; bad lines name file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hetpd.bench.traces import TRACE_FORMATS, TraceError, TraceFormat, TraceRecord, detect_format, read_trace, sample_path


def words(text: str) -> int:
    return len(text.split())


def test_azure_sample() -> None:
    trace = read_trace(sample_path("azure"))
    assert len(trace.records) == 200 and trace.skipped == 0 and trace.timed
    # First rows of the file: 18:15:46.6805900,374,44 and 18:15:50.9951690,396,109.
    assert trace.records[0] == TraceRecord(0.0, 374, 44)
    assert trace.records[1].input_tokens == 396 and trace.records[1].output_tokens == 109
    assert trace.records[1].at == pytest.approx(4.314579, abs=1e-9)  # sub-second digits kept
    times = [r.at for r in trace.records]
    assert all(a is not None and b is not None and a <= b for a, b in zip(times, times[1:]))


def test_azure_keeps_seven_fraction_digits(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 23:59:59.9999999,5,6\n"
                    "2023-11-17 00:00:00.0000001,7,8\n")
    records = read_trace(path).records
    assert records[1].at == pytest.approx(2e-7, abs=1e-12)  # across midnight, 100 ns apart


def test_mooncake_sample() -> None:
    trace = read_trace(sample_path("mooncake"))
    assert len(trace.records) == 200 and trace.timed
    first = trace.records[0]
    assert (first.at, first.input_tokens, first.output_tokens) == (0.0, 6758, 500)
    assert first.prefix_ids == tuple(range(14))
    assert trace.records[1].prefix_ids[0] == 0  # the shared system prompt block
    times = [r.at or 0.0 for r in trace.records]
    assert times == sorted(times) and times[-1] == pytest.approx(72.0)  # ms -> s


def test_sharegpt_lengths_sample() -> None:
    trace = read_trace(sample_path("sharegpt_lengths"))
    assert len(trace.records) == 200 and not trace.timed
    assert trace.records[0] == TraceRecord(None, 74, 918)


def test_sharegpt_sample_counts_turns_and_skips() -> None:
    trace = read_trace(sample_path("sharegpt"), count_tokens=words)
    assert len(trace.records) == 8 and trace.skipped == 2  # one single-turn, one empty conversation
    assert trace.records[0] == TraceRecord(None, words("What is the boiling point of water at sea level?"),
                                           words("At sea level water boils at 100 degrees Celsius, which is "
                                                 "212 degrees Fahrenheit."))
    with pytest.raises(TraceError, match="count_tokens"):
        read_trace(sample_path("sharegpt"))


def test_sharegpt_uses_first_human_turn_and_its_answer(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps([
        {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "a b c"},
                           {"from": "gpt", "value": "d e"}, {"from": "human", "value": "f"}]},
        {"conversations": [{"from": "gpt", "value": "hello"}, {"from": "gpt", "value": "again"}]},
    ]))
    trace = read_trace(path, count_tokens=words)
    assert trace.records == (TraceRecord(None, 3, 2),) and trace.skipped == 1


@pytest.mark.parametrize("fmt", TRACE_FORMATS)
def test_limit_and_sniffing(fmt: TraceFormat) -> None:
    path = sample_path(fmt)
    assert detect_format(path) == fmt
    assert len(read_trace(path, count_tokens=words, limit=5).records) == 5
    assert read_trace(path, format=fmt, count_tokens=words) == read_trace(path, count_tokens=words)


def test_sniffing_reads_content_not_only_suffix(tmp_path: Path) -> None:
    path = tmp_path / "renamed.txt"
    path.write_text(sample_path("azure").read_text())
    assert detect_format(path) == "azure"
    (tmp_path / "x.txt").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(TraceError, match=r"x\.txt:1: cannot tell the trace format"):
        read_trace(tmp_path / "x.txt")
    with pytest.raises(TraceError, match="not a trace format"):
        read_trace(path, format="csv")


def _lines(path: Path, head: str, rows: list[str]) -> Path:
    path.write_text("\n".join([head, *rows]) + "\n" if head else "\n".join(rows) + "\n")
    return path


GOOD_MOONCAKE = '{"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [0]}'


@pytest.mark.parametrize(("row", "message"), [
    ('{"timestamp": 5, "input_length": -3, "output_length": 5}', "'input_length' must be a positive integer, got -3"),
    ('{"timestamp": 5, "input_length": 3, "output_length": true}', "'output_length' must be a positive integer"),
    ('{"timestamp": -1, "input_length": 3, "output_length": 5}', "'timestamp' must be a non-negative number"),
    ('{"timestamp": 5, "input_length": 3, "output_length": 5, "hash_ids": "ab"}', "'hash_ids' must be a list"),
    ('{"timestamp": 5, "input_length": 3,', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_mooncake_bad_line_names_file_and_line(tmp_path: Path, row: str, message: str) -> None:
    path = _lines(tmp_path / "trace.jsonl", "", [GOOD_MOONCAKE, "", row])
    with pytest.raises(TraceError) as err:
        read_trace(path)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)


@pytest.mark.parametrize(("row", "message"), [
    ("2023-11-16 18:15:47.1,0,5", "'ContextTokens' must be a positive integer, got '0'"),
    ("2023-11-16 18:15:47.1,3,x", "'GeneratedTokens' must be a positive integer, got 'x'"),
    ("yesterday,3,5", "'TIMESTAMP' must look like"),
    ("2023-11-16 18:15:47.1,3", "expected 3 fields, got 2"),
])
def test_azure_bad_line_names_file_and_line(tmp_path: Path, row: str, message: str) -> None:
    path = _lines(tmp_path / "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens", ["2023-11-16 18:15:46.6,1,1", row])
    with pytest.raises(TraceError) as err:
        read_trace(path)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)


def test_csv_missing_column_and_bad_length(tmp_path: Path) -> None:
    path = _lines(tmp_path / "a.csv", "TIMESTAMP,ContextTokens", ["2023-11-16 18:15:46.6,1"])
    with pytest.raises(TraceError, match=r"a\.csv:1: missing column\(s\) \['GeneratedTokens'\]"):
        read_trace(path, format="azure")
    path = _lines(tmp_path / "s.csv", "num_prefill_tokens,num_decode_tokens", ["3,4", "5,-1"])
    with pytest.raises(TraceError, match=r"s\.csv:3: 'num_decode_tokens' must be a positive integer, got '-1'"):
        read_trace(path)


@pytest.mark.parametrize(("text", "line", "message"), [
    ('[\n  {"conversations": []},\n  {"conversations": "hi"}\n]', 3, "conversation 1: expected"),
    ('[\n  {"conversations": [\n    {"from": "human"}]}\n]', 2, "turn 0 must be"),
    ('[\n  {"conversations": []}\n  {"conversations": []}\n]', 3, "expected ',' or ']'"),
    ('[\n  {"conversations": [}\n]', 2, "not valid JSON"),
    ('{"conversations": []}', 1, "a ShareGPT file is a JSON list"),
])
def test_sharegpt_bad_entry_names_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(TraceError) as err:
        read_trace(path, format="sharegpt", count_tokens=words)
    assert str(err.value).startswith(f"{path}:{line}: ") and message in str(err.value)


def test_unreadable_file_is_a_trace_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read"):
        read_trace(tmp_path / "missing.jsonl", format="mooncake")
