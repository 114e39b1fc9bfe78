"""Engine behaviour: stopping rules, validation, abort, precision variants, the LLM API."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hetpd import LLM, SamplingParams
from hetpd.engine.config import EngineConfig
from hetpd.engine.engine import Engine

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture()
def engine(tiny_model_dir: Callable[[str], Path]) -> Engine:
    return Engine.from_config(EngineConfig(model=str(tiny_model_dir("llama")), block_size=4, num_kv_blocks=32))


def run(engine: Engine) -> dict[str, object]:
    outputs: dict[str, object] = {}
    while engine.has_unfinished():
        for out in engine.step().finished:
            outputs[out.request_id] = out
    return outputs


def test_max_tokens_and_stop_token(engine: Engine) -> None:
    engine.add_request("a", [5, 6, 7], GREEDY)
    greedy = run(engine)["a"]
    tokens = list(greedy.token_ids)  # type: ignore[attr-defined]
    assert len(tokens) == 8 and greedy.outputs[0].finish_reason == "length"  # type: ignore[attr-defined]
    stop_at = tokens[3]
    engine.add_request("b", [5, 6, 7], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(stop_at,)))
    stopped = run(engine)["b"]
    first = tokens.index(stop_at)
    assert list(stopped.token_ids) == tokens[: first + 1]  # type: ignore[attr-defined]
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason == stop_at  # type: ignore[attr-defined]


def test_stop_string_cuts_the_text(engine: Engine) -> None:
    assert engine.tokenizer is not None
    engine.add_request("a", [5, 6, 7], GREEDY)
    text = run(engine)["a"].text  # type: ignore[attr-defined]
    words = text.split()
    stop = words[2]
    engine.add_request("b", [5, 6, 7], SamplingParams(max_tokens=8, temperature=0.0, stop=[stop], ignore_eos=True))
    out = run(engine)["b"]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop  # type: ignore[attr-defined]
    assert out.text == text[: text.index(stop)]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("tokens", "params", "message"),
    [
        ([], GREEDY, "prompt is empty"),
        ([5, 999], GREEDY, "outside the vocabulary"),
        ([5] * 510, GREEDY, "exceeds the model's context length"),
    ],
)
def test_bad_requests_are_refused_without_touching_state(
    engine: Engine, tokens: list[int], params: SamplingParams, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        engine.add_request("x", tokens, params)
    assert not engine.has_unfinished()
    assert engine.allocator.stats().num_in_use == 0


def test_bad_sampling_params_name_the_field() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)


def test_duplicate_request_id_is_refused(engine: Engine) -> None:
    engine.add_request("a", [5, 6], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [5, 6], GREEDY)


def test_abort_mid_generation_frees_every_page(engine: Engine) -> None:
    engine.add_request("a", list(range(3, 30)), GREEDY)
    engine.add_request("b", list(range(3, 12)), GREEDY)
    engine.step()
    engine.step()
    assert engine.allocator.stats().num_in_use > 0
    assert engine.abort("a") and engine.abort("b") and not engine.abort("nope")
    assert not engine.has_unfinished()
    assert engine.allocator.stats().num_in_use == 0


def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=42, ignore_eos=True)
    engine.add_request("a", [5, 6, 7], params)
    engine.add_request("noise", [9, 9], SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True))
    first = run(engine)["a"].token_ids  # type: ignore[attr-defined]
    engine.add_request("b", [5, 6, 7], params)
    assert run(engine)["b"].token_ids == first  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("dtype", "quantization", "kv", "tolerance"),
    [
        ("bfloat16", None, "auto", 0.15),
        ("float32", "int8", "auto", 0.15),
        ("float32", None, "int8", 0.1),
        ("float32", None, "fp8_e4m3", 0.3),
        ("float32", None, "float16", 0.01),
    ],
)
def test_precision_variants_stay_close_to_fp32(
    tiny_model_dir: Callable[[str], Path], dtype: str, quantization: str | None, kv: str, tolerance: float
) -> None:
    model = str(tiny_model_dir("qwen2"))
    prompt = list(range(3, 40))

    def first_logits(config: EngineConfig) -> torch.Tensor:
        engine = Engine.from_config(config)
        engine.add_request("a", prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        rows = []
        while engine.has_unfinished():
            rows += list(engine.step().logits.values())
        return torch.stack(rows)

    reference = first_logits(EngineConfig(model=model))
    variant = first_logits(EngineConfig(model=model, dtype=dtype, quantization=quantization, kv_cache_dtype=kv))
    # Relative to the logits' spread: a variant that computed garbage would be off by ~1.
    error = (variant[0] - reference[0]).abs().max() / reference[0].abs().max()
    assert error < tolerance


def test_llm_generate_and_chat(tiny_model_dir: Callable[[str], Path]) -> None:
    llm = LLM(str(tiny_model_dir("llama")), block_size=4, num_kv_blocks=64)
    outputs = llm.generate(["w1 w2 w3", "w7"], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert [len(o.token_ids) for o in outputs] == [5, 5]
    assert outputs[0].prompt == "w1 w2 w3" and outputs[0].prompt_token_ids == (4, 5, 6)
    by_ids = llm.generate([[4, 5, 6]], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert by_ids[0].token_ids == outputs[0].token_ids
    chat = llm.chat([{"role": "user", "content": "w9"}], SamplingParams(max_tokens=3, temperature=0.0))
    assert chat[0].prompt == "<s>user w9 </s><s>assistant"
