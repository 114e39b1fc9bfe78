"""Prefill-role export + decode-role import against colocated generation.

Matching KV dtypes on the two sides must be token-identical to a colocated engine: the bytes
are used as is. When the dtypes differ, no pair is identical by construction (the prefill side
attends to the prompt through its own KV precision, the decode side stores new tokens in its
own), so on tiny random models we check the first token exactly and the first decode step's
logits against the colocated engine within the codec's error; on the real model we check
greedy tokens, on every prompt whose output the precision change does not itself flip.
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
from hetpd.kv.layout import codec_of, unpack
from hetpd.kv.format import IncompatibleKVError

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
MATCHING = ["float32", "bfloat16", "float16", "int8", "fp8_e4m3"]
CONVERTED_PAIRS = [("float32", "bfloat16"), ("float32", "int8"), ("float32", "fp8_e4m3"), ("bfloat16", "float32"),
                   ("int8", "float32"), ("fp8_e4m3", "bfloat16")]


def pair(model: str, producer_kv: str, consumer_kv: str, **extra: object) -> DisaggregatedPair:
    prefill = Engine.from_config(EngineConfig(model=model, role="prefill", kv_cache_dtype=producer_kv, block_size=8, **extra))  # type: ignore[arg-type]
    decode = Engine.from_config(EngineConfig(model=model, role="decode", kv_cache_dtype=consumer_kv, block_size=4, **extra))  # type: ignore[arg-type]
    return DisaggregatedPair(prefill, decode)


def prompts(vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (4, 29, 13)]


@pytest.mark.parametrize("kv_dtype", MATCHING)
def test_matching_formats_are_token_identical_to_colocated(tiny_model_dir: Callable[[str], Path], kv_dtype: str) -> None:
    model = str(tiny_model_dir("qwen3"))
    pd = pair(model, kv_dtype, kv_dtype)
    batch = prompts(pd.prefill.model_config.vocab_size)
    result = pd.generate(batch, GREEDY)
    reference = LLM(model, kv_cache_dtype=kv_dtype).generate(batch, GREEDY)
    assert [o.token_ids for o in result.outputs] == [o.token_ids for o in reference]
    assert result.handoffs.num_handoffs == 3 and not result.handoffs.converted
    assert pd.prefill.allocator.stats().num_in_use == 0 and not pd.prefill.held_request_ids()
    assert pd.decode.allocator.stats().num_in_use == 0


@pytest.mark.parametrize(("producer_kv", "consumer_kv"), CONVERTED_PAIRS)
def test_converted_handoff_stays_within_the_codec_error(
    tiny_model_dir: Callable[[str], Path], producer_kv: str, consumer_kv: str
) -> None:
    model = str(tiny_model_dir("llama"))
    prefill = Engine.from_config(EngineConfig(model=model, role="prefill", kv_cache_dtype=producer_kv))
    decode = Engine.from_config(EngineConfig(model=model, role="decode", kv_cache_dtype=consumer_kv))
    colocated = Engine.from_config(EngineConfig(model=model, kv_cache_dtype=producer_kv))
    prompt = prompts(prefill.model_config.vocab_size)[1]
    prefill.add_request("r", prompt, GREEDY)
    colocated.add_request("r", prompt, GREEDY)
    first = prefill.step()
    reference_first = colocated.step()
    assert first.sampled == reference_first.sampled
    export = prefill.export_kv("r")
    assert decode.import_kv(export, GREEDY).accepted
    prefill.release_kv("r")

    # Element by element, the consumer now holds the producer's values within its own codec's rounding.
    codes, scales, _ = unpack(export.payload, export.format, export.num_tokens)
    sent = codec_of(export.format).decode(codes, scales, torch.float32)
    slots = decode.kv_cache.slots_of(decode.scheduler.running[0].block_table, export.num_tokens)
    held, held_scales = decode.kv_cache.read_tokens(slots)
    received = decode.kv_cache.codec.decode(held, held_scales, torch.float32)
    bound = decode.kv_cache.codec.scale_bound * sent.abs().amax(dim=-1, keepdim=True) * 1.0001
    assert torch.all((received - sent).abs() <= bound)

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
    from hetpd.kv.check import VerdictKind, check
    from hetpd.kv.format import KVFormat

    prefill = Engine.from_config(EngineConfig(model=str(tiny_model_dir("llama")), role="prefill", kv_cache_dtype="int8"))
    fmt = prefill.kv_format
    assert KVFormat.from_json(fmt.to_json()) == fmt
    newer_peer = KVFormat.from_json(fmt.to_json()[:-1] + ', "swizzle": 1}')
    verdict = check(newer_peer, fmt)
    assert verdict.kind is VerdictKind.INCOMPATIBLE and "swizzle" in verdict.explain()


def handoff_with_logits(
    prefill: Engine, decode: Engine, batch: list[list[int]], params: SamplingParams
) -> dict[str, tuple[list[int], list[torch.Tensor]]]:
    """Run a batch through prefill -> export -> import -> decode, keeping every sampled token's logits."""
    runs: dict[str, tuple[list[int], list[torch.Tensor]]] = {str(i): ([], []) for i in range(len(batch))}
    for i, prompt in enumerate(batch):
        prefill.add_request(str(i), prompt, params)
    engines = (prefill, decode)
    while any(e.has_unfinished() for e in engines) or prefill.held_request_ids():
        for engine in engines:
            if not engine.has_unfinished():
                continue
            step = engine.step()
            for request_id, token in step.sampled.items():
                runs[request_id][0].append(token)
                runs[request_id][1].append(step.logits[request_id])
        for request_id in prefill.held_request_ids():
            assert decode.import_kv(prefill.export_kv(request_id), params).accepted
            prefill.release_kv(request_id)
    return runs


@pytest.mark.slow
def test_smollm2_handoff_with_different_precision_per_role(smollm2_dir: Path) -> None:
    """The real model, KV converted on import, greedy: tokens equal the colocated engine's (with the
    decode side's KV dtype) except where the two runs meet a near tie. At the first token where they
    differ, if any, the handoff's logits must rank the two candidates within ``NEAR_TIE`` of each other:
    a conversion bug shows up as a large gap, a precision-level wobble as a small one."""
    model = str(smollm2_dir)
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
                 "Explain photosynthesis to a child in two sentences.", "hi"]
    params = SamplingParams(max_tokens=20, temperature=0.0)
    near_tie = 0.25  # logits; bf16/fp16 KV rounding moves SmolLM2's logits by a few hundredths
    for producer_kv, consumer_kv in (("float32", "bfloat16"), ("bfloat16", "float32"), ("float32", "float16")):
        llm = LLM(model, kv_cache_dtype=consumer_kv)
        assert llm.engine.tokenizer is not None
        batch = [llm.engine.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions]
        reference = [list(o.token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in batch], params)]
        pd = pair(model, producer_kv, consumer_kv)
        runs = handoff_with_logits(pd.prefill, pd.decode, batch, params)
        identical = 0
        for i, expected in enumerate(reference):
            tokens, logits = runs[str(i)]
            if tokens == expected:
                identical += 1
                continue
            j = next(k for k, (a, b) in enumerate(zip(tokens, expected)) if a != b)
            gap = float(logits[j][tokens[j]] - logits[j][expected[j]])
            assert 0 <= gap < near_tie, f"{producer_kv}->{consumer_kv} {questions[i]!r}: token {j} gap {gap:.3f}"
        assert identical >= 4, f"{producer_kv}->{consumer_kv}: only {identical}/5 prompts token-identical"
