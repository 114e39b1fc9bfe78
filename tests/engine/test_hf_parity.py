"""Correctness against HF transformers: logits of prefill and 32 decode steps, every architecture.

Each case runs a mixed-length batch through the engine with chunked prefill (a small token
budget) and, in one variant, a KV pool too small for the batch so sequences get preempted
and recomputed. HF then scores each finished sequence in one forward pass; the engine's
logits at every sampled position must match in fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import ARCHITECTURES
from hetpd.engine.config import EngineConfig
from hetpd.engine.engine import Engine
from hetpd.sampling_params import SamplingParams

DECODE_STEPS = 32
PROMPT_LENGTHS = (3, 41, 17, 9)
FP32_ATOL = 2e-4


def run_engine(engine: Engine, prompts: list[list[int]], max_tokens: int) -> tuple[dict[str, list[int]], dict[str, torch.Tensor], int]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    logits: dict[str, list[torch.Tensor]] = {str(i): [] for i in range(len(prompts))}
    tokens: dict[str, list[int]] = {}
    preempted = 0
    while engine.has_unfinished():
        step = engine.step()
        preempted += step.num_preempted
        for request_id, row in step.logits.items():
            logits[request_id].append(row.clone())
        for out in step.finished:
            tokens[out.request_id] = list(out.token_ids)
    assert engine.allocator.stats().num_in_use == 0, "KV pages leaked after every request finished"
    return tokens, {k: torch.stack(v) for k, v in logits.items()}, preempted


def random_prompts(vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("kind", ARCHITECTURES)
@pytest.mark.parametrize("scenario", ["chunked", "preempted"])
def test_logits_match_hf(kind: str, scenario: str, tiny_model_dir: Callable[[str], Path]) -> None:
    model_dir = tiny_model_dir(kind)
    if scenario == "chunked":
        config = EngineConfig(model=str(model_dir), block_size=8, num_kv_blocks=64, max_num_batched_tokens=16)
    else:
        # 11 pages of 4 tokens cannot hold four sequences growing to 73 tokens at once.
        config = EngineConfig(model=str(model_dir), block_size=4, num_kv_blocks=20, max_num_batched_tokens=32)
    engine = Engine.from_config(config)
    prompts = random_prompts(engine.model_config.vocab_size, seed=len(kind))
    tokens, logits, preempted = run_engine(engine, prompts, DECODE_STEPS)
    if scenario == "preempted":
        assert preempted > 0, "the scenario is meant to force preemption"

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for i, prompt in enumerate(prompts):
        full = prompt + tokens[str(i)]
        assert len(tokens[str(i)]) == DECODE_STEPS
        with torch.no_grad():
            reference = hf(torch.tensor([full])).logits[0, len(prompt) - 1 : len(full) - 1]
        ours = logits[str(i)]
        assert ours.shape == reference.shape
        torch.testing.assert_close(ours, reference, atol=FP32_ATOL, rtol=1e-4)
        # The engine's greedy choice is the argmax of HF's logits at every step.
        assert tokens[str(i)] == reference.argmax(-1).tolist()


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_prefix_cache_hit_gives_the_same_logits(kind: str, tiny_model_dir: Callable[[str], Path]) -> None:
    engine = Engine.from_config(EngineConfig(model=str(tiny_model_dir(kind)), block_size=4, num_kv_blocks=64))
    prompt = random_prompts(engine.model_config.vocab_size, seed=3)[1]
    _, first, _ = run_engine(engine, [prompt], 4)
    engine.add_request("again", prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    rows = []
    cached = 0
    while engine.has_unfinished():
        step = engine.step()
        rows += [row for rid, row in step.logits.items()]
        cached = max([cached] + [o.metrics.num_cached_tokens for o in step.finished])
    assert cached == (len(prompt) - 1) // 4 * 4
    torch.testing.assert_close(torch.stack(rows), first["0"], atol=FP32_ATOL, rtol=1e-4)
