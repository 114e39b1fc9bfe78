"""A served 1P1D deployment, driven through the official ``openai`` client over real HTTP.

Prefill and decode differ in precision (fp32 weights and KV on prefill; bf16 weights and
int8 KV on decode), so every request's KV is quantised on its way across. Workers are real
processes; the bytes move over shared memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from serve.served import Served, serve

from hetpd.engine.config import EngineConfig
from hetpd.engine.disaggregated import DisaggregatedPair
from hetpd.engine.engine import Engine
from hetpd.kv.plan import plan_handoff
from hetpd.models.tokenizer import Tokenizer
from hetpd.sampling_params import SamplingParams

PREFILL = {"dtype": "float32", "kv_cache_dtype": "float32", "block_size": 16}
DECODE = {"dtype": "bfloat16", "kv_cache_dtype": "int8", "block_size": 16}
PROMPT = "w5 w17 w42 w8 w99 w3 w61 w7 w120 w33 w2 w250"
API_KEY = "test-key"
SECRET = "test-secret"


def deployment(model: Path, **router: Any) -> dict[str, Any]:
    return {"model": str(model), "served_model_name": "tiny", "router": {"host": "127.0.0.1", "secret": SECRET, **router},
            "handoff": {"lease_ttl_s": 3.0, "heartbeat_s": 0.5},
            "pools": [{"name": "prefill", "role": "prefill", "num_kv_blocks": 64, **PREFILL},
                      {"name": "decode", "role": "decode", "num_kv_blocks": 64, **DECODE}]}


@pytest.fixture(scope="module")
def served(tiny_model_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(deployment(tiny_model_dir("llama"), api_key=API_KEY), tmp_path_factory.mktemp("serve")) as s:
        yield s


@pytest.fixture(scope="module")
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Callable[[str], Path]) -> Callable[[list[int], int], str]:
    """The same precision per role, in one process (the in-process pair): what the server must say."""
    model = str(tiny_model_dir("llama"))
    prefill = Engine.from_config(EngineConfig(model=model, role="prefill", **PREFILL))  # type: ignore[arg-type]
    decode = Engine.from_config(EngineConfig(model=model, role="decode", **DECODE))  # type: ignore[arg-type]
    pair = DisaggregatedPair(prefill, decode)
    tokenizer = Tokenizer.from_dir(Path(model))

    def run(prompt: list[int], max_tokens: int) -> str:
        out = pair.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0)).outputs[0]
        return tokenizer.decode(list(out.token_ids))

    return run


def tokens_of(tiny_model_dir: Callable[[str], Path], text: str, chat: bool = False) -> list[int]:
    tokenizer = Tokenizer.from_dir(tiny_model_dir("llama"))
    return tokenizer.encode_chat([{"role": "user", "content": text}]) if chat else tokenizer.encode(text)


@pytest.mark.timeout(300)
def test_completions_match_the_in_process_pair(served: Served, client: openai.OpenAI,
                                               reference: Callable[[list[int], int], str],
                                               tiny_model_dir: Callable[[str], Path]) -> None:
    expected = reference(tokens_of(tiny_model_dir, PROMPT), 12)
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert reply.choices[0].text == expected and reply.usage is not None and reply.usage.completion_tokens == 12
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
    assert streamed == expected
    served.wait_idle()


@pytest.mark.timeout(300)
def test_chat_streaming_and_not(served: Served, client: openai.OpenAI, reference: Callable[[list[int], int], str],
                                tiny_model_dir: Callable[[str], Path]) -> None:
    expected = reference(tokens_of(tiny_model_dir, PROMPT, chat=True), 10)
    messages = [{"role": "user", "content": PROMPT}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == expected
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,  # type: ignore[arg-type]
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    served.wait_idle()


@pytest.mark.timeout(300)
def test_logprobs_seed_and_stop(served: Served, client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],  # type: ignore[arg-type]
                                           max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 6 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob <= 0 for t in content)
    seeded = [client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7)
              .choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    stop_word = full.split()[3]
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop_word])
    assert cut.choices[0].finish_reason == "stop" and stop_word not in cut.choices[0].text
    served.wait_idle()


@pytest.mark.timeout(120)
def test_models_health_metrics_and_trace(served: Served, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert served.get("/health")["status"] == "ok"
    reply = client.completions.with_raw_response.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    request_id = reply.headers["x-request-id"]
    deadline = time.monotonic() + 10
    while "release" not in (steps := served.get(f"/v1/requests/{request_id}/trace")["steps"]):
        assert time.monotonic() < deadline, steps  # the producer releases just after the decode side commits
        time.sleep(0.05)
    lifecycle = ["queued", "dispatched", "first_token", "lease_offered", "reserve", "transfer_start", "transfer_end",
                 "commit", "first_decode_token", "finished"]
    assert all(step in steps for step in lifecycle + ["release"]), steps
    assert [steps[s] for s in lifecycle] == sorted(steps[s] for s in lifecycle)  # in lifecycle order
    metrics = served.get("/metrics")
    for name in ("hetpd_time_to_first_token_seconds_count", "hetpd_inter_token_latency_seconds",
                 "hetpd_queue_depth", "hetpd_kv_pages_in_use", "hetpd_leases_ended_total",
                 "hetpd_kv_bytes_received", "hetpd_kv_handoff_seconds", "hetpd_kv_transfer_seconds",
                 "hetpd_kv_conversion_seconds_count"):
        assert name in metrics, name


def _post(served: Served, path: str, body: dict[str, Any], key: str | None = API_KEY) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(served.url + path, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("body", "status", "says"), [
    ({"model": "tiny", "prompt": PROMPT, "max_tokens": 100000}, 400, "exceeds the context length"),
    ({"model": "tiny", "prompt": PROMPT, "n": 2}, 400, "only n=1"),
    ({"model": "tiny", "prompt": PROMPT, "temperature": 5}, 400, "temperature"),
    ({"model": "tiny", "prompt": PROMPT, "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "gpt-9", "prompt": PROMPT}, 404, "is not served here"),
    ({"model": "tiny", "prompt": [5, 999999]}, 400, "token ids"),
])
def test_bad_requests_get_a_clear_4xx(served: Served, body: dict[str, Any], status: int, says: str) -> None:
    code, reply = _post(served, "/v1/completions", body)
    assert code == status and says in reply["error"]["message"], reply
    served.wait_idle()


@pytest.mark.timeout(60)
def test_the_api_key_is_required(served: Served) -> None:
    code, reply = _post(served, "/v1/completions", {"model": "tiny", "prompt": PROMPT}, key=None)
    assert code == 401 and "API key" in reply["error"]["message"]
    code, _ = _post(served, "/v1/completions", {"model": "tiny", "prompt": PROMPT}, key="wrong")
    assert code == 401


@pytest.mark.timeout(120)
def test_the_kv_crosses_in_the_planned_wire_format(served: Served, client: openai.OpenAI,
                                                    tiny_model_dir: Callable[[str], Path]) -> None:
    """fp32 prefill to int8 decode: the plan quantises on the producer, so int8 bytes (plus
    scales) cross, not fp32 ones converted on arrival."""
    model = str(tiny_model_dir("llama"))
    producer = Engine.from_config(EngineConfig(model=model, role="prefill", **PREFILL))  # type: ignore[arg-type]
    consumer = Engine.from_config(EngineConfig(model=model, role="decode", **DECODE))  # type: ignore[arg-type]
    wire = plan_handoff(producer.kv_format, consumer.kv_format).wire
    assert wire.dtype == "int8" and wire.bytes_per_token() < producer.kv_format.bytes_per_token() / 2
    before = served.get("/v1/admin/workers")["decode-0"]["kv_bytes_received"]
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0)
    assert reply.usage is not None
    prompt_tokens = reply.usage.prompt_tokens
    deadline = time.monotonic() + 10
    while (received := served.get("/v1/admin/workers")["decode-0"]["kv_bytes_received"]) == before:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert received - before == wire.payload_bytes(prompt_tokens)


@pytest.mark.timeout(120)
def test_client_disconnect_mid_stream_frees_everything(served: Served, client: openai.OpenAI) -> None:
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=200, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # the client goes away with most of the request still to generate
    served.wait_idle()


def _join(served: Served, model: Path, secret: str) -> subprocess.CompletedProcess[str]:
    control = served.log().split("router control on ")[1].split(";")[0]
    return subprocess.run(
        [sys.executable, "-m", "hetpd.cli", "worker", "--router", control, "--secret", secret, "--role", "decode",
         "--worker-id", "intruder", "--model", str(model)], capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(180)
def test_a_worker_without_the_secret_is_refused(served: Served, tiny_model_dir: Callable[[str], Path]) -> None:
    joined = _join(served, tiny_model_dir("llama"), "not-the-secret")
    assert joined.returncode == 3 and "authentication failed" in joined.stderr
    assert "intruder" not in served.get("/health")["workers"]


@pytest.mark.timeout(180)
def test_a_worker_with_an_incompatible_kv_format_is_refused(served: Served,
                                                          tiny_model_dir: Callable[[str], Path]) -> None:
    joined = _join(served, tiny_model_dir("qwen3"), SECRET)  # another model: its KV means something else
    assert joined.returncode == 3 and "cannot join" in joined.stderr and "model.architecture" in joined.stderr
    assert "intruder" not in served.get("/health")["workers"]
    assert "model.head_dim" in served.log() or "model.architecture" in served.log()


@pytest.mark.timeout(120)
def test_hetpd_chat_streams_a_conversation(served: Served) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hetpd.cli", "chat", "--url", served.url, "--api-key", API_KEY, "--max-tokens", "5",
         "--temperature", "0"], input="w5 w6 w7\n/reset\nw9\n/quit\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "chatting with tiny" in done.stdout
    assert done.stdout.count("assistant> ") == 2 and done.stdout.count("first token") == 2
    served.wait_idle()
