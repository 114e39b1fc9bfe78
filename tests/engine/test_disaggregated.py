"""Prefill-role export + decode-role import == colocated generation.

Lossless pairs (same dtype, or a conversion that keeps every value the consumer would have
stored itself) must be token-identical to a colocated engine using the consumer's KV dtype.
Lossy pairs (to int8 / fp8) cannot be: the colocated engine also attends to its prompt
through quantised KV while the prefill side used full precision. For those we check the
first decode step's logits against the colocated engine's, within the codec's error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hetpd import LLM, SamplingParams
from hetpd.engine.config import EngineConfig
from hetpd.engine.disaggregated import DisaggregatedPair
from hetpd.engine.engine import Engine
from hetpd.kv.format import IncompatibleKVError

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
LOSSLESS_PAIRS = [("float32", "float32"), ("bfloat16", "bfloat16"), ("int8", "int8"), ("fp8_e4m3", "fp8_e4m3"),
                  ("float32", "bfloat16"), ("bfloat16", "float32"), ("float16", "float32")]


def pair(model: str, producer_kv: str, consumer_kv: str, **extra: object) -> DisaggregatedPair:
    prefill = Engine.from_config(EngineConfig(model=model, role="prefill", kv_cache_dtype=producer_kv, block_size=8, **extra))  # type: ignore[arg-type]
    decode = Engine.from_config(EngineConfig(model=model, role="decode", kv_cache_dtype=consumer_kv, block_size=4, **extra))  # type: ignore[arg-type]
    return DisaggregatedPair(prefill, decode)


def prompts(vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (4, 29, 13)]


@pytest.mark.parametrize(("producer_kv", "consumer_kv"), LOSSLESS_PAIRS)
def test_handoff_is_token_identical_to_colocated(
    tiny_model_dir: Callable[[str], Path], producer_kv: str, consumer_kv: str
) -> None:
    model = str(tiny_model_dir("qwen3"))
    pd = pair(model, producer_kv, consumer_kv)
    batch = prompts(pd.prefill.model_config.vocab_size)
    result = pd.generate(batch, GREEDY)
    reference = LLM(model, kv_cache_dtype=consumer_kv).generate(batch, GREEDY)
    if producer_kv in ("float32", "float16") and consumer_kv == "bfloat16":
        # fp32 -> bf16 rounds once on import, as the colocated bf16 engine rounds once on write;
        # but the prefill side attended in full precision, so only the first token is pinned.
        assert [o.token_ids[0] for o in result.outputs] == [o.token_ids[0] for o in reference]
    else:
        assert [o.token_ids for o in result.outputs] == [o.token_ids for o in reference]
    assert result.handoffs.num_handoffs == 3 and result.handoffs.converted == (producer_kv != consumer_kv)
    assert pd.prefill.allocator.stats().num_in_use == 0 and not pd.prefill.held_request_ids()
    assert pd.decode.allocator.stats().num_in_use == 0


@pytest.mark.parametrize("consumer_kv", ["int8", "fp8_e4m3"])
def test_lossy_conversion_stays_within_the_codec_error(tiny_model_dir: Callable[[str], Path], consumer_kv: str) -> None:
    model = str(tiny_model_dir("llama"))
    prefill = Engine.from_config(EngineConfig(model=model, role="prefill"))
    decode = Engine.from_config(EngineConfig(model=model, role="decode", kv_cache_dtype=consumer_kv))
    colocated = Engine.from_config(EngineConfig(model=model))
    prompt = prompts(prefill.model_config.vocab_size)[1]
    prefill.add_request("r", prompt, GREEDY)
    colocated.add_request("r", prompt, GREEDY)
    first = prefill.step()
    reference_first = colocated.step()
    assert first.sampled == reference_first.sampled
    assert decode.import_kv(prefill.export_kv("r"), GREEDY).accepted
    prefill.release_kv("r")
    ours = decode.step().logits["r"]
    reference = colocated.step().logits["r"]
    relative = (ours - reference).abs().max() / reference.abs().max()
    assert relative < 0.1, f"{consumer_kv} KV moved the logits by {relative:.3f} of their range"


def test_incompatible_model_is_refused_by_name(tiny_model_dir: Callable[[str], Path]) -> None:
    prefill = Engine.from_config(EngineConfig(model=str(tiny_model_dir("llama")), role="prefill"))
    decode = Engine.from_config(EngineConfig(model=str(tiny_model_dir("qwen3")), role="decode"))
    prefill.add_request("r", [5, 6, 7], GREEDY)
    prefill.step()
    with pytest.raises(IncompatibleKVError, match="head_dim|architecture"):
        decode.import_kv(prefill.export_kv("r"), GREEDY)
    assert decode.allocator.stats().num_in_use == 0
    prefill.release_kv("r")
    assert prefill.allocator.stats().num_in_use == 0


def test_import_is_refused_when_the_pool_is_full_and_nothing_leaks(tiny_model_dir: Callable[[str], Path]) -> None:
    model = str(tiny_model_dir("llama"))
    prefill = Engine.from_config(EngineConfig(model=model, role="prefill", block_size=4))
    decode = Engine.from_config(EngineConfig(model=model, role="decode", block_size=4, num_kv_blocks=5))
    prefill.add_request("r", list(range(3, 30)), SamplingParams(max_tokens=2, temperature=0.0))
    prefill.step()
    result = decode.import_kv(prefill.export_kv("r"), SamplingParams(max_tokens=2, temperature=0.0))
    assert not result.accepted and "KV pages" in result.reason
    assert decode.allocator.stats().num_in_use == 0 and prefill.held_request_ids() == ["r"]
    assert prefill.abort("r") and prefill.allocator.stats().num_in_use == 0


def test_export_survives_a_json_round_trip_of_its_format(tiny_model_dir: Callable[[str], Path]) -> None:
    from hetpd.kv.format import KVFormat

    prefill = Engine.from_config(EngineConfig(model=str(tiny_model_dir("llama")), role="prefill", kv_cache_dtype="int8"))
    fmt = prefill.kv_format
    assert KVFormat.from_json(fmt.to_json()) == fmt
    with pytest.raises(IncompatibleKVError, match="does not know"):
        KVFormat.from_json(fmt.to_json()[:-1] + ', "swizzle": 1}')


@pytest.mark.slow
def test_smollm2_handoff_with_different_precision_per_role(smollm2_dir: Path) -> None:
    """The real model: fp32 prefill -> bf16-KV decode and bf16 -> fp32, token-identical to colocated."""
    model = str(smollm2_dir)
    llm = LLM(model, kv_cache_dtype="bfloat16")
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
    batch = [llm.engine.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions]  # type: ignore[union-attr]
    params = SamplingParams(max_tokens=20, temperature=0.0)
    reference = [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in batch], params)]
    for producer_kv in ("float32", "bfloat16"):
        result = pair(model, producer_kv, "bfloat16").generate(batch, params)
        assert [o.token_ids for o in result.outputs] == reference, producer_kv
