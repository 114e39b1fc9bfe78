"""Prompt builder: exact lengths, no special ids, shared prefixes exactly where asked."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hetpd.bench.prompts import PromptBuilder
from hetpd.bench.traces import read_trace, sample_path
from hetpd.bench.workload import RequestSpec

SPECIAL = frozenset({0, 1, 2, 31999})


def spec(index: int, tokens: int, prefix: tuple[int, ...] = ()) -> RequestSpec:
    return RequestSpec(index, 0.0, tokens, 8, prefix)


@settings(max_examples=60, deadline=None)
@given(tokens=st.integers(1, 3000), prefix=st.lists(st.integers(0, 50), max_size=8), index=st.integers(0, 10**6),
       block=st.integers(1, 600))
def test_exact_length_without_special_ids(tokens: int, prefix: list[int], index: int, block: int) -> None:
    ids = PromptBuilder(32000, SPECIAL, block_tokens=block).build(spec(index, tokens, tuple(prefix)))
    assert len(ids) == tokens
    assert all(0 <= t < 32000 and t not in SPECIAL for t in ids)


def test_tiny_vocabulary_avoids_special_ids() -> None:
    ids = PromptBuilder(5, frozenset({0, 1, 2, 4})).build(spec(0, 100))
    assert ids == [3] * 100
    with pytest.raises(ValueError, match="special_ids"):
        PromptBuilder(3, frozenset({0, 1, 2}))


def test_shared_prefix_ids_share_leading_blocks() -> None:
    builder = PromptBuilder(32000, SPECIAL, block_tokens=512)
    a = builder.build(spec(0, 1800, (7, 8, 9, 10)))
    b = builder.build(spec(1, 1800, (7, 8, 42, 43)))
    assert a[:1024] == b[:1024]  # blocks 7 and 8
    assert a[1024:1040] != b[1024:1040]
    # Blocks shorter than the prompt: the rest is unique to each request.
    c = builder.build(spec(2, 1500, (7,)))
    d = builder.build(spec(3, 1500, (7,)))
    assert c[:512] == d[:512] == a[:512] and c[512:528] != d[512:528]


def test_prefix_cut_to_length_is_still_a_prefix() -> None:
    builder = PromptBuilder(32000, SPECIAL, block_tokens=512)
    long = builder.build(spec(0, 2048, (1, 2, 3, 4)))
    short = builder.build(spec(1, 700, (1, 2, 3, 4)))
    assert short == long[:700]


def test_unrelated_requests_share_no_prefix() -> None:
    builder = PromptBuilder(32000, SPECIAL)
    heads = {tuple(builder.build(spec(i, 64))[:16]) for i in range(500)}
    assert len(heads) == 500
    firsts = {builder.build(spec(i, 600, (i + 1000,)))[0] for i in range(50)}
    assert len(firsts) > 40  # different prefix ids start differently too


def test_deterministic_across_builders_and_seeded() -> None:
    request = spec(5, 900, (3, 4))
    assert PromptBuilder(32000, SPECIAL).build(request) == PromptBuilder(32000, SPECIAL).build(request)
    assert PromptBuilder(32000, SPECIAL, seed=1).build(request) != PromptBuilder(32000, SPECIAL).build(request)


def test_a_salt_changes_the_unique_part_only() -> None:
    """A sweep's runs use their own salts: no run finds another run's prompt in a prefix cache."""
    request = spec(5, 900, (3,))
    plain, salted = PromptBuilder(32000, SPECIAL, block_tokens=512), PromptBuilder(32000, SPECIAL, block_tokens=512,
                                                                                   salt="run-1")
    assert plain.build(request)[:512] == salted.build(request)[:512]  # the trace's shared prefix stays shared
    assert plain.build(request)[512:] != salted.build(request)[512:]
    assert PromptBuilder(32000, SPECIAL, salt="").build(request) == plain.build(request)


def test_mooncake_sample_prefix_sharing() -> None:
    """The Mooncake trace's shared hash ids become shared token blocks."""
    builder = PromptBuilder(32000, SPECIAL)
    records = read_trace(sample_path("mooncake")).records[:20]
    prompts = [builder.build(RequestSpec(i, r.at, r.input_tokens, r.output_tokens, r.prefix_ids))
               for i, r in enumerate(records)]
    for record, prompt in zip(records, prompts):
        assert len(prompt) == record.input_tokens
        assert prompt[:512] == prompts[0][:512]  # every record starts with hash id 0


def test_text_needs_decode() -> None:
    request = spec(0, 10)
    with pytest.raises(ValueError, match="decode"):
        PromptBuilder(100).text(request)
    builder = PromptBuilder(100, decode=lambda ids: " ".join(map(str, ids)))
    assert builder.text(request).split() == [str(t) for t in builder.build(request)]


@pytest.mark.parametrize(("vocab", "block", "field"), [(0, 512, "vocab_size"), (100, 0, "block_tokens")])
def test_bad_arguments(vocab: int, block: int, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PromptBuilder(vocab, block_tokens=block)
