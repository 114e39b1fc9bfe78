"""The embedded default deployment (SmolLM2-135M-Instruct: prefill fp32, decode bf16 with int8 KV)
through the official openai client, against the same precision per role in one process."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from serve.served import serve

from hetpd.engine.config import EngineConfig
from hetpd.engine.disaggregated import DisaggregatedPair
from hetpd.engine.engine import Engine
from hetpd.sampling_params import SamplingParams
from hetpd.serve.deploy import default_deployment

QUESTIONS = ["What is the capital of France?", "Name three primary colours."]


@pytest.mark.timeout(600)
def test_default_deployment_matches_the_in_process_pair(smollm2_dir: Path, tmp_path: Path) -> None:
    deploy = default_deployment().model_dump()
    deploy["model"] = str(smollm2_dir)
    prefill_pool, decode_pool = default_deployment().pools
    with serve(deploy, tmp_path) as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        answers = [client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                  max_tokens=24, temperature=0) for q in QUESTIONS]
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=24, temperature=0,
            stream=True) if c.choices)
        served.wait_idle()
    pair = DisaggregatedPair(
        Engine.from_config(EngineConfig(model=str(smollm2_dir), role="prefill", dtype=prefill_pool.dtype,
                                        kv_cache_dtype=prefill_pool.kv_cache_dtype)),
        Engine.from_config(EngineConfig(model=str(smollm2_dir), role="decode", dtype=decode_pool.dtype,
                                        kv_cache_dtype=decode_pool.kv_cache_dtype)),
    )
    tokenizer = pair.prefill.tokenizer
    assert tokenizer is not None
    prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    expected = [o.text for o in pair.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0)).outputs]
    assert [a.choices[0].message.content for a in answers] == expected
    assert streamed == expected[0]
    assert "Paris" in expected[0]
