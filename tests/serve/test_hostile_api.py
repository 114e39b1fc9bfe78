"""Hostile requests against a real ``hetpd serve``: each is refused with a 4xx naming the problem
(or the connection closed), and the deployment keeps serving, holding no KV page or lease.

The deployment serves a tiny llama with a byte-level BPE tokenizer (as SmolLM2's or Llama 3's)
whose longest token is 256 bytes, and an 8192-token context: text over 8191 x 256 bytes cannot
fit and is refused by its size; text under that is tokenised (2 MB takes most of a second here),
in a thread, while the router keeps answering. Its HTTP limits are tight so that the slow-client
tests take seconds: header and body timeouts of 1.5 s, bodies up to 6 MB.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from serve.served import Served, serve
from tiny_models import BASE, CHAT_TEMPLATE, byte_level

from hetpd.models.tokenizer import Tokenizer
from hetpd.sampling_params import SEED_MAX, SEED_MIN
from hetpd.serve.http_guard import json_shape_problem

API_KEY = "hostile-key"
CONTEXT = 8192
LONGEST_TOKEN = 256  # bytes: "a" * 256
HEADER_TIMEOUT_S = 1.5
BODY_TIMEOUT_S = 1.5
MAX_BODY = 6 << 20
PROMPT = "the cat sat on the mat"


def make_byte_level_model(out_dir: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_level(LONGEST_TOKEN)
    config = LlamaConfig(**{**BASE, "vocab_size": tokenizer.get_vocab_size(), "max_position_embeddings": CONTEXT,
                            "bos_token_id": tokenizer.token_to_id("<s>"), "eos_token_id": tokenizer.token_to_id("</s>")})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # as tiny_models: weights large enough that logits are far from uniform
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.8, 1.2)
            else:
                param.normal_(0, 0.08)
    model.save_pretrained(out_dir)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}))
    return out_dir


def deployment(model: Path, **router: Any) -> dict[str, Any]:
    return {"model": str(model), "served_model_name": "tiny",
            "router": {"host": "127.0.0.1", "secret": "hostile-secret", "api_key": API_KEY,
                       "header_timeout_s": HEADER_TIMEOUT_S, "body_timeout_s": BODY_TIMEOUT_S,
                       "max_body_bytes": MAX_BODY, **router},
            "handoff": {"lease_ttl_s": 3.0, "heartbeat_s": 0.5},
            "pools": [{"name": "prefill", "role": "prefill", "num_kv_blocks": 600},
                      {"name": "decode", "role": "decode", "num_kv_blocks": 600, "dtype": "bfloat16",
                       "kv_cache_dtype": "int8"}]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_byte_level_model(tmp_path_factory.mktemp("byte-level"))


@pytest.fixture(scope="module")
def served(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(deployment(model_dir), tmp_path_factory.mktemp("hostile")) as s:
        yield s


# ---------------------------------------------------------------------- clients
def call(served: Served, path: str, body: Any = None, key: str | None = API_KEY, raw: bytes | None = None,
         timeout: float = 60) -> tuple[int, Any, float]:
    """(status, parsed JSON body, seconds) of one request; ``body`` is sent as JSON (lone
    surrogates escaped as JSON allows), ``raw`` as is."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(served.url + path, data=data, headers=headers)
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, payload = error.code, error.read()
    took = time.monotonic() - started
    try:
        return status, json.loads(payload), took
    except ValueError:
        return status, payload.decode(errors="replace"), took


def complete(served: Served, **fields: Any) -> tuple[int, Any]:
    status, reply, _ = call(served, "/v1/completions", {"model": "tiny", **fields})
    return status, reply


def chat(served: Served, messages: list[dict[str, Any]], **fields: Any) -> tuple[int, Any]:
    status, reply, _ = call(served, "/v1/chat/completions", {"model": "tiny", "messages": messages, **fields})
    return status, reply


def still_serving(served: Served) -> None:
    status, reply = complete(served, prompt=PROMPT, max_tokens=4, temperature=0)
    assert status == 200 and reply["usage"]["completion_tokens"] == 4, reply
    served.wait_idle(timeout=10)


def refused(reply: Any, status: int, expected: int, param: str, says: str) -> None:
    assert status == expected, reply
    error = reply["error"]
    assert error["param"] == param and says in error["message"], error


def connect(served: Served) -> socket.socket:
    address = urllib.parse.urlsplit(served.url)
    return socket.create_connection((address.hostname, address.port), timeout=10)


def until_closed(sock: socket.socket, limit: float = 10.0) -> tuple[float, bytes]:
    """Read until the server closes the connection: (seconds it took, what it sent)."""
    started, received = time.monotonic(), b""
    sock.settimeout(limit)
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {limit} s; it sent {received[:200]!r}")
    return time.monotonic() - started, received


def head(path: str, length: int | None = None, chunked: bool = False) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: hetpd", f"Authorization: Bearer {API_KEY}",
             "Content-Type: application/json"]
    lines += [f"Content-Length: {length}"] if length is not None else []
    lines += ["Transfer-Encoding: chunked"] if chunked else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def response_of(received: bytes) -> tuple[int, dict[str, Any]]:
    status_line, _, rest = received.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


class HealthProbe:
    """Polls /health every 10 ms on one keep-alive connection, recording when and how long."""

    def __init__(self, served: Served) -> None:
        address = urllib.parse.urlsplit(served.url)
        self.host, self.port = str(address.hostname), int(address.port or 80)
        self.samples: list[tuple[float, float]] = []  # (sent at, seconds to answer)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                connection.request("GET", "/health")
                response = connection.getresponse()
                response.read()
                assert response.status == 200
            except (ConnectionError, http.client.HTTPException):
                connection.close()  # the server may close an idle keep-alive connection: start another
                connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
                continue
            self.samples.append((sent, time.monotonic() - sent))
            time.sleep(0.01)
        connection.close()

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def during(self, start: float, end: float) -> list[float]:
        """How long each poll that overlapped [start, end] took (a poll held up across it counts)."""
        return [took for sent, took in self.samples if sent <= end and sent + took >= start]


# ---------------------------------------------------------------------- the cases
@pytest.mark.timeout(120)
def test_a_seed_torch_refuses_gets_a_4xx_and_the_workers_keep_serving(served: Served) -> None:
    # This one used to answer 400 and then kill the prefill worker (KeyError in engine.step).
    status, reply = chat(served, [{"role": "user", "content": PROMPT}], seed=18446744073709551616, temperature=0.7)
    refused(reply, status, 400, "seed", "seed")
    for seed in (SEED_MAX + 1, SEED_MIN - 1, True, 1.5, "7"):
        status, reply = complete(served, prompt=PROMPT, seed=seed, temperature=0.7)
        refused(reply, status, 400, "seed", "seed")
    still_serving(served)
    for seed in (SEED_MIN, SEED_MAX):  # the whole range seeds a generator on the workers, reproducibly
        texts = {complete(served, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=seed)[1]["choices"][0]["text"]
                 for _ in range(2)}
        assert len(texts) == 1
    served.wait_idle(timeout=10)


@pytest.mark.timeout(120)
def test_lone_surrogates_are_refused_naming_the_field(served: Served) -> None:
    status, reply = complete(served, prompt="the \ud800 cat")
    refused(reply, status, 400, "prompt", "prompt")
    status, reply = chat(served, [{"role": "user", "content": "fine"}, {"role": "user", "content": "a\udfff"}])
    refused(reply, status, 400, "messages[1].content", "not valid Unicode")
    status, reply = chat(served, [{"role": "user", "content": [{"type": "text", "text": "\udbff!"}]}])
    refused(reply, status, 400, "messages[0].content", "not valid Unicode")
    status, reply = complete(served, prompt=PROMPT, stop=["\ud800"])
    refused(reply, status, 400, "stop", "stop")
    status, reply = complete(served, model="\ud800", prompt=PROMPT)  # echoed back in the message, escaped
    assert status == 404 and "is not served here" in reply["error"]["message"]
    still_serving(served)


@pytest.mark.timeout(120)
def test_a_prompt_longer_than_the_context_without_max_tokens_is_a_400(served: Served) -> None:
    long_text = " b" * 9000  # 18000 tokens (space and b): 18 kB, well under the size bound, so it is tokenised
    status, reply = complete(served, prompt=long_text)
    refused(reply, status, 400, "prompt", f"(18000 tokens) leaves no room for output in the context length {CONTEXT}")
    status, reply = chat(served, [{"role": "user", "content": long_text}])
    refused(reply, status, 400, "messages", f"context length {CONTEXT}")
    status, reply = complete(served, prompt=[7] * 9000)
    refused(reply, status, 400, "prompt", f"context length {CONTEXT}")
    still_serving(served)


@pytest.mark.timeout(180)
def test_a_prompt_of_the_whole_context_is_a_400_and_one_token_less_gets_one_token(served: Served) -> None:
    status, reply = complete(served, prompt=[7] * CONTEXT)  # used to be a 500: max_tokens 0
    refused(reply, status, 400, "prompt", f"({CONTEXT} tokens) leaves no room for output")
    status, reply = complete(served, prompt=[7] * (CONTEXT - 1), temperature=0)  # room for exactly one
    assert status == 200, reply
    assert reply["usage"]["completion_tokens"] == 1 and reply["choices"][0]["finish_reason"] == "length"
    status, reply = complete(served, prompt=[7] * (CONTEXT - 1), max_tokens=2)
    refused(reply, status, 400, "max_tokens", "exceeds the context length")
    served.wait_idle(timeout=10)


@pytest.mark.timeout(120)
def test_token_ids_must_be_integers_of_the_vocabulary(served: Served) -> None:
    vocab = Tokenizer(byte_level(LONGEST_TOKEN), {}).vocab_size
    for ids in ([True, 5], [5, 1.5], [5, "6"], [-1], [vocab], [10**30], []):
        status, reply = complete(served, prompt=ids, max_tokens=2)
        assert status == 400 and reply["error"]["param"] == "prompt", (ids, reply)
    status, reply = complete(served, prompt=[5.0, vocab - 1], max_tokens=2)  # integral numbers are integers
    assert status == 200, reply
    served.wait_idle(timeout=10)


@pytest.mark.timeout(120)
def test_a_temperature_below_1e_5_is_greedy(served: Served) -> None:
    greedy = complete(served, prompt=PROMPT, max_tokens=12, temperature=0)[1]["choices"][0]["text"]
    for temperature in (1e-40, 5e-324, 9e-6):  # 1e-40 used to divide the logits into inf and NaN
        status, reply = complete(served, prompt=PROMPT, max_tokens=12, temperature=temperature, seed=3)
        assert status == 200 and reply["choices"][0]["text"] == greedy, (temperature, reply)
    for raw in (b'{"model": "tiny", "prompt": "x", "temperature": NaN}',
                b'{"model": "tiny", "prompt": "x", "temperature": Infinity}',
                b'{"model": "tiny", "prompt": "x", "top_p": NaN}'):
        status, reply, _ = call(served, "/v1/completions", raw=raw)
        assert status == 400 and reply["error"]["param"] in ("temperature", "top_p"), reply
    served.wait_idle(timeout=10)


@pytest.mark.timeout(120)
def test_an_oversized_body_gets_a_413_without_being_read(served: Served) -> None:
    with connect(served) as sock:  # announced: refused before any of it is read
        sock.sendall(head("/v1/completions", length=MAX_BODY + 1) + b'{"model": "tiny", "prompt": "')
        took, received = until_closed(sock)
    status, body = response_of(received)
    assert status == 413 and body["error"]["code"] == 413 and took < 1.0, (took, received[:300])
    with connect(served) as sock:  # chunked: counted as it arrives
        sock.sendall(head("/v1/completions", chunked=True))
        piece = b"x" * (1 << 20)
        try:
            for _ in range(MAX_BODY // len(piece) + 2):
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-stream and closed: the response is already there
        _, received = until_closed(sock)
    assert response_of(received)[0] == 413
    still_serving(served)


@pytest.mark.timeout(120)
def test_a_body_that_does_not_arrive_in_time_gets_a_408(served: Served) -> None:
    with connect(served) as sock:
        sock.sendall(head("/v1/completions", length=100) + b'{"model": "tiny", ')  # and then nothing more
        took, received = until_closed(sock)
    status, body = response_of(received)
    assert status == 408 and "not complete within" in body["error"]["message"]
    assert BODY_TIMEOUT_S - 0.1 < took < BODY_TIMEOUT_S + 2.0, took
    still_serving(served)


@pytest.mark.timeout(120)
def test_a_connection_that_never_completes_its_request_head_is_closed(served: Served) -> None:
    for partial in (b"POST /v1/completions HTTP/1.1\r\nHost: hetpd\r\nAuthoriz", b""):  # slowloris; silence
        with connect(served) as sock:
            sock.sendall(partial)
            took, received = until_closed(sock)
        assert received == b"" and HEADER_TIMEOUT_S - 0.1 < took < HEADER_TIMEOUT_S + 2.0, (partial, took)
    with connect(served) as sock:  # after a response, the next head has the same deadline
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: hetpd\r\n\r\nGET /hea")
        took, received = until_closed(sock)
    assert received.startswith(b"HTTP/1.1 200") and received.count(b"HTTP/1.1") == 1
    assert took < HEADER_TIMEOUT_S + 2.0, took
    still_serving(served)


@pytest.mark.timeout(120)
def test_health_answers_within_100ms_while_a_large_prompt_is_tokenised_or_a_4mb_one_refused(served: Served,
                                                                                          model_dir: Path) -> None:
    tokenizer = Tokenizer.from_dir(model_dir)
    most = tokenizer.max_text_bytes(CONTEXT - 1)
    assert most == (CONTEXT - 1) * LONGEST_TOKEN
    large = "a" * 1_900_000 + " b" * 2000  # under the bound, so tokenised: ~7.4k + 2k tokens, too many
    assert len(large) < most < 4_000_000
    with HealthProbe(served) as probe:
        started = time.monotonic()
        status, reply, took = call(served, "/v1/completions", {"model": "tiny", "prompt": large})
        refusing = time.monotonic()
        huge = [call(served, "/v1/completions", {"model": "tiny", "prompt": "a" * 4_000_000}) for _ in range(3)]
        ended = time.monotonic()
    during_tokenising, during_refusals = probe.during(started, started + took), probe.during(refusing, ended)
    print(f"tokenising {len(large)} bytes took {took:.2f}s, /health max {max(during_tokenising) * 1000:.1f} ms over "
          f"{len(during_tokenising)} polls; 4 MB refused in {max(t for _, _, t in huge):.2f}s, /health max "
          f"{max(during_refusals) * 1000:.1f} ms over {len(during_refusals)} polls")
    refused(reply, status, 400, "prompt", "tokens) leaves no room for output")  # a token count: it was tokenised
    assert took > 0.3, took
    for status, reply, took_huge in huge:
        refused(reply, status, 400, "prompt", "bytes of UTF-8: more than fits the context length")
        assert took_huge < took / 2, (took_huge, took)  # refused by size, far faster than tokenising
    assert len(during_tokenising) >= 5 and len(during_refusals) >= 3, (during_tokenising, during_refusals)
    assert max(during_tokenising) < 0.1 and max(during_refusals) < 0.1, (during_tokenising, during_refusals)
    still_serving(served)


@pytest.mark.parametrize(("body", "problem"), [
    (b'{"x": [' + b"[[]]," * 20_000 + b"0]}", "arrays and objects"),
    (b'{"x": [' + b"0," * 300_000 + b"0]}", "JSON values"),
    (json.dumps({"prompt": "[{,\\\" " * 100_000, "stop": ["]", "{"]}).encode(), None),  # structure in strings
    (json.dumps({"prompt": [123456] * (CONTEXT - 1), "messages": [{"role": "user"}] * 2048}).encode(), None),
])
def test_the_json_shape_scan_counts_structure_outside_strings(body: bytes, problem: str | None) -> None:
    found = json_shape_problem(body)
    assert found is None if problem is None else (found is not None and problem in found), found


@pytest.mark.timeout(120)
def test_a_body_of_a_million_tiny_arrays_is_refused_before_it_is_parsed(served: Served) -> None:
    # Parsing 5 MB of "[[]]," would hold the event loop (and the GIL) for most of a second.
    body = b'{"model": "tiny", "prompt": "x", "ignored": [' + b"[[]]," * 1_000_000 + b"0]}"
    with HealthProbe(served) as probe:
        started = time.monotonic()
        status, reply, took = call(served, "/v1/completions", raw=body)
    latencies = probe.during(started, started + took)
    assert status == 413 and "JSON arrays and objects" in reply["error"]["message"], reply
    assert took < 0.5 and max(latencies) < 0.1, (took, latencies)
    still_serving(served)


@pytest.mark.timeout(120)
def test_a_non_streaming_client_that_disconnects_has_its_request_aborted(served: Served) -> None:
    def outcomes() -> dict[str, float]:
        lines = [line for line in str(served.get("/metrics")).splitlines() if line.startswith("hetpd_requests_total{")]
        return {line.split('"')[1]: float(line.split()[-1]) for line in lines}

    before = outcomes()
    body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 8000, "ignore_eos": True,
                       "temperature": 0}).encode()  # generating all of it would take many seconds
    with connect(served) as sock:
        sock.sendall(head("/v1/completions", length=len(body)) + body)
        deadline = time.monotonic() + 30
        while not (running := served.get("/v1/admin/requests")) or not any(
                r["output_tokens"] > 10 for r in running.values()):
            assert time.monotonic() < deadline, running
            time.sleep(0.05)
    gone = time.time()  # the client closed its connection: nobody will read the answer
    (request_id, state), = running.items()
    while "aborted" not in (steps := served.get(f"/v1/requests/{request_id}/trace")["steps"]):
        assert time.time() - gone < 5, steps
        time.sleep(0.02)
    time.sleep(0.6)  # workers report their pages every 0.25 s: let a report from after the abort arrive
    workers = served.wait_idle(timeout=5)
    idle_after = time.time() - gone
    print(f"disconnected after {state['output_tokens']} of 8000 tokens; aborted {steps['aborted'] - gone:.2f}s "
          f"later, workers idle within {idle_after:.2f}s")
    assert "finished" not in served.get(f"/v1/requests/{request_id}/trace")["steps"]
    assert steps["aborted"] - gone < 1.0 and idle_after < 3.0, (steps["aborted"] - gone, idle_after)
    assert all(w.get("running", 0) == 0 for w in workers.values()), workers  # generation stopped, not just paused
    assert not served.get("/v1/admin/requests")
    assert outcomes().get("aborted", 0) == before.get("aborted", 0) + 1


@pytest.mark.timeout(60)
def test_a_wrong_or_missing_key_is_refused_on_v1_and_metrics(served: Served) -> None:
    for key in (None, "wrong", API_KEY + "x", API_KEY[:-1]):
        for path in ("/v1/models", "/v1/admin/workers", "/v1/admin/requests", "/v1/requests/req-1/trace", "/metrics"):
            status, reply, _ = call(served, path, key=key)
            assert status == 401 and reply["error"]["type"] == "authentication_error", (key, path, reply)
        status, reply, _ = call(served, "/v1/completions", {"model": "tiny", "prompt": PROMPT}, key=key)
        assert status == 401, reply
    assert call(served, "/health", key=None)[0] == 200  # probes need no key
    assert call(served, "/metrics")[0] == 200


@pytest.mark.timeout(180)
def test_metrics_public_serves_metrics_without_the_key(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    with serve(deployment(tiny_model_dir("llama"), metrics_public=True), tmp_path) as public:
        status, text, _ = call(public, "/metrics", key=None)
        assert status == 200 and "hetpd_requests_total" in text
        assert call(public, "/v1/models", key=None)[0] == 401  # the API itself still needs the key
