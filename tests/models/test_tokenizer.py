"""Tokenizer: encode gives the ids it always gave without holding the GIL; and the byte bound
that lets a server refuse text too long for the context without tokenising it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import byte_level
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers

from hetpd.models.tokenizer import Tokenizer, bytes_per_token_bound, utf8_length

TEXTS = ["", "w5 w17 w42", "Hello, world! 123 456", "héllo 漢字 \U0001f600 \x04\x00 tabs\tand\nnewlines   ",
         "a" * 5000, "<s> special </s> inside"]


def spec(tokenizer: HFTokenizer) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(tokenizer.to_str())
    return result


@pytest.fixture()
def tiny(tiny_model_dir: Callable[[str], Path]) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model_dir("llama"))


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("special", [True, False])
def test_encode_gives_the_ids_of_the_backend_encode(tiny: Tokenizer, text: str, special: bool) -> None:
    for tokenizer in (tiny, Tokenizer(byte_level(), {})):
        assert tokenizer.encode(text, special) == tokenizer.backend.encode(text, add_special_tokens=special).ids


def test_encode_leaves_other_threads_running() -> None:
    """A long encode in a thread holds the event loop up by milliseconds, not by its duration."""
    tokenizer = Tokenizer(byte_level(), {})
    text = "hello world, again and again " * 40_000  # 1.2 MB: hundreds of ms to tokenise here

    async def measure() -> tuple[float, float]:
        started = time.perf_counter()
        task = asyncio.ensure_future(asyncio.to_thread(tokenizer.encode, text))
        worst, last = 0.0, time.perf_counter()
        while not task.done():
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            worst, last = max(worst, now - last), now
        await task
        return time.perf_counter() - started, worst

    took, worst_gap = asyncio.run(measure())
    assert took > 0.2, took  # long enough that holding the GIL would show
    assert worst_gap < 0.1, (took, worst_gap)


def test_utf8_length_counts_bytes_and_refuses_lone_surrogates() -> None:
    assert utf8_length("a é 漢 \U0001f600") == 1 + 1 + 2 + 1 + 3 + 1 + 4
    with pytest.raises(UnicodeEncodeError):
        utf8_length("ok \ud800")


def test_byte_level_bpe_is_bounded_by_its_longest_token() -> None:
    assert bytes_per_token_bound(spec(byte_level(longest=64))) == 64
    assert Tokenizer(byte_level(longest=256), {}).max_text_bytes(8191) == 8191 * 256


def test_normalizers_that_shrink_text_widen_the_bound_and_ones_that_delete_remove_it() -> None:
    assert bytes_per_token_bound(spec(byte_level(64, normalizers.NFC()))) == 64 * 4
    assert bytes_per_token_bound(spec(byte_level(64, normalizers.Sequence([normalizers.Lowercase()])))) == 64 * 3
    for deleting in (normalizers.Strip(), normalizers.StripAccents(), normalizers.Replace(" ", ""),
                     normalizers.BertNormalizer()):
        assert bytes_per_token_bound(spec(byte_level(64, deleting))) is None, deleting


def test_tokenizers_where_one_token_can_cover_any_length_have_no_bound(tiny: Tokenizer) -> None:
    # Word-level with an unknown token (and a pre-tokenizer that drops whitespace): a word of a
    # million unknown letters is one token.
    assert len(tiny.encode("x" * 1_000_000)) <= 2 and tiny.max_bytes_per_token is None
    no_symbols = spec(byte_level())
    del no_symbols["model"]["vocab"]["Ā"]  # a byte with no symbol and no unknown token: dropped
    assert bytes_per_token_bound(no_symbols) is None
    stripping = spec(byte_level())
    stripping["added_tokens"][0]["lstrip"] = True  # swallows any run of whitespace before it
    assert bytes_per_token_bound(stripping) is None


def test_byte_fallback_bpe_is_bounded() -> None:
    vocab = {f"<0x{b:02X}>": b for b in range(256)} | {"▁the": 256, "<unk>": 257}
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    assert bytes_per_token_bound(spec(tokenizer)) == len("▁the".encode())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", "aaaa", "b", " ", "\n", "é", "漢", "\U0001f600", "<s>", "</s>", "\x00"]),
                max_size=200).map("".join) | st.text(max_size=200))
def test_the_bound_holds_for_any_text(text: str) -> None:
    """No text of more than n x bound bytes tokenises to n or fewer tokens."""
    for tokenizer in (Tokenizer(byte_level(8), {}), Tokenizer(byte_level(8, normalizers.NFKC()), {})):
        per_token = tokenizer.max_bytes_per_token
        assert per_token is not None
        assert len(tokenizer.encode(text, add_special_tokens=False)) * per_token >= utf8_length(text)


@pytest.mark.slow
def test_smollm2s_bound(smollm2_dir: Path) -> None:
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    assert tokenizer.max_bytes_per_token == 81  # "\n" and 80 spaces; 8192 tokens hold at most 663,552 bytes
    for text in ("\n" + " " * 80, "#" * 80 * 50, "\x04\x06\x13 control bytes without symbols", "a" * 100_000):
        assert len(tokenizer.encode(text, add_special_tokens=False)) * 81 >= utf8_length(text)
