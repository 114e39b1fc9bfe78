"""Other shapes of deployment: lossless relayout over TCP, colocated, and a worker joining by hand."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from serve.served import Served, serve

from hetpd.engine.config import EngineConfig
from hetpd.engine.engine import Engine
from hetpd.models.tokenizer import Tokenizer
from hetpd.sampling_params import SamplingParams

PROMPT = "w5 w17 w42 w8 w99 w3 w61 w7 w120 w33 w2 w250"


def colocated_text(model: Path, max_tokens: int, **engine: Any) -> str:
    e = Engine.from_config(EngineConfig(model=str(model), **engine))
    tokenizer = Tokenizer.from_dir(model)
    e.add_request("r", tokenizer.encode(PROMPT), SamplingParams(max_tokens=max_tokens, temperature=0.0))
    while e.has_unfinished():
        for out in e.step().finished:
            return out.text
    raise AssertionError("no output")


def ask(served: Served, max_tokens: int = 12, stream: bool = False) -> str:
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=90)
    if stream:
        return "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=max_tokens, temperature=0, stream=True))
    return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=max_tokens, temperature=0).choices[0].text


@pytest.mark.timeout(300)
def test_a_lossless_relayout_over_tcp_is_token_identical_to_colocated(tiny_model_dir: Callable[[str], Path],
                                                                      tmp_path: Path) -> None:
    """fp32 KV on both sides, pages of 8 on prefill and 16 on decode: the verdict is a lossless
    relayout, so the served output is exactly the colocated engine's."""
    model = tiny_model_dir("llama")
    deploy = {"model": str(model), "served_model_name": "tiny", "router": {"host": "127.0.0.1"},
              "pools": [{"name": "prefill", "role": "prefill", "kv_cache_dtype": "float32", "block_size": 8,
                         "transport": "tcp", "num_kv_blocks": 64},
                        {"name": "decode", "role": "decode", "kv_cache_dtype": "float32", "block_size": 16,
                         "transport": "tcp", "num_kv_blocks": 64}]}
    expected = colocated_text(model, 12, kv_cache_dtype="float32")
    with serve(deploy, tmp_path) as served:
        assert "lossless_relayout" in served.log() and "repage" in served.log()
        assert ask(served) == expected
        assert ask(served, stream=True) == expected
        served.wait_idle()


@pytest.mark.timeout(300)
def test_colocated_mode(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    model = tiny_model_dir("llama")
    deploy = {"model": str(model), "served_model_name": "tiny", "router": {"host": "127.0.0.1"},
              "pools": [{"name": "both", "role": "colocated", "count": 2, "dtype": "bfloat16",
                         "kv_cache_dtype": "int8", "num_kv_blocks": 64}]}
    expected = colocated_text(model, 12, dtype="bfloat16", kv_cache_dtype="int8")
    with serve(deploy, tmp_path) as served:
        assert ask(served) == expected and ask(served, stream=True) == expected
        served.wait_idle()


@pytest.mark.timeout(300)
def test_a_worker_started_by_hand_joins_and_serves(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    """How a deployment spans machines: `hetpd worker --router HOST:PORT` joins a running router."""
    model = tiny_model_dir("llama")
    deploy = {"model": str(model), "served_model_name": "tiny", "router": {"host": "127.0.0.1"},  # secret generated
              "pools": [{"name": "prefill", "role": "prefill", "num_kv_blocks": 64, "transport": "tcp"},
                        {"name": "decode", "role": "decode", "num_kv_blocks": 64, "transport": "tcp",
                         "kv_cache_dtype": "int8"}]}
    with serve(deploy, tmp_path) as served:
        control = served.log().split("router control on ")[1].split(";")[0]
        secret_file = served.log().split("shared secret in ")[1].split(" ")[0]  # the 0600 file hetpd serve wrote
        env = {k: v for k, v in os.environ.items() if k != "HETPD_SECRET"}
        extra = subprocess.Popen(
            [sys.executable, "-m", "hetpd.cli", "worker", "--router", control, "--role", "decode", "--worker-id",
             "decode-by-hand", "--model", str(model), "--kv-cache-dtype", "fp8", "--transport", "tcp",
             "--num-kv-blocks", "64", "--advertise-host", "127.0.0.1", "--secret-file", secret_file],
            env=env, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while "decode-by-hand" not in served.get("/health")["workers"]:
                assert extra.poll() is None and time.monotonic() < deadline, extra.stderr.read() if extra.stderr else ""
                time.sleep(0.2)
            assert "prefill-0 -> decode-by-hand" in served.log()
            for _ in range(4):  # both decode workers get work (most free pages first)
                assert len(ask(served, max_tokens=6).split()) == 6
            served.wait_idle()
        finally:
            extra.terminate()
            extra.wait(timeout=30)
