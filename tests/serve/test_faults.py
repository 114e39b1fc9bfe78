"""Faults against a served deployment: real worker processes dying, stalling, corrupting bytes.

Every request ends within its deadline with its tokens or a clear error, and afterwards every
surviving worker reports no pages in use, no live lease, nothing held or reserved.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from serve.served import Served, serve

PROMPT = "w5 w17 w42 w8 w99 w3 w61 w7 w120 w33 w2 w250"


def deployment(model: Path, *, recovery: str = "retry", decode_count: int = 1, decode_blocks: int = 64,
               ttl: float = 3.0, max_queue: int = 64) -> dict[str, Any]:
    return {"model": str(model), "served_model_name": "tiny",
            "router": {"host": "127.0.0.1", "max_queue": max_queue},
            "handoff": {"lease_ttl_s": ttl, "heartbeat_s": ttl / 4, "recovery": recovery, "max_attempts": 3,
                        "request_timeout_s": 60},
            "pools": [{"name": "prefill", "role": "prefill", "num_kv_blocks": 64},
                      {"name": "decode", "role": "decode", "count": decode_count, "num_kv_blocks": decode_blocks,
                       "dtype": "bfloat16", "kv_cache_dtype": "int8"}]}


def complete(served: Served, max_tokens: int = 10, stream: bool = False) -> tuple[str, int]:
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=90)
    if stream:
        chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                                stream=True))
        return "".join(c.choices[0].text for c in chunks), len("".join(c.choices[0].text for c in chunks).split())
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=max_tokens, temperature=0)
    assert reply.usage is not None
    return reply.choices[0].text, reply.usage.completion_tokens


@pytest.mark.timeout(300)
def test_prefill_worker_dies_mid_handoff_and_decode_recomputes(tiny_model_dir: Callable[[str], Path],
                                                                tmp_path: Path) -> None:
    with serve(deployment(tiny_model_dir("llama"), recovery="recompute"), tmp_path,
               env={"HETPD_FAULTS": "prefill:exit_after_offer"}) as served:
        text, tokens = complete(served)
        assert tokens == 10 and len(text.split()) == 10
        assert "went away mid-request" in served.log()
        assert set(served.wait_idle()) == {"decode-0"}  # the prefill worker is gone, decode holds nothing


@pytest.mark.timeout(300)
def test_decode_worker_dies_mid_stream_and_the_request_moves(tiny_model_dir: Callable[[str], Path],
                                                             tmp_path: Path) -> None:
    with serve(deployment(tiny_model_dir("llama"), decode_count=2), tmp_path,
               env={"HETPD_FAULTS": "decode-0:exit_after_tokens=3,decode-1:exit_after_tokens=3"}) as served:
        text, words = complete(served, max_tokens=6, stream=True)
        assert words == 6  # every token once: what was streamed before the crash is not repeated
        survivors = served.wait_idle()
        assert len(survivors) == 2 and "prefill-0" in survivors  # exactly one decode worker died


@pytest.mark.timeout(300)
def test_corrupted_kv_bytes_fail_the_checksum_and_are_retried(tiny_model_dir: Callable[[str], Path],
                                                              tmp_path: Path) -> None:
    with serve(deployment(tiny_model_dir("llama")), tmp_path,
               env={"HETPD_FAULTS": "prefill:corrupt=*"}) as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=90)
        reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
        assert reply.usage is not None and reply.usage.completion_tokens == 10
        assert "checksum" in served.log()
        trace = served.get(f"/v1/requests/{reply.id}/trace")["steps"]
        assert "recovery_1" in trace and "commit" in trace
        served.wait_idle()


@pytest.mark.timeout(300)
def test_a_frozen_decode_worker_lets_the_lease_expire_and_nothing_leaks(tiny_model_dir: Callable[[str], Path],
                                                                         tmp_path: Path) -> None:
    # Frozen for 4 s (heartbeats too) on a 1 s TTL; the router would move the request only after 10 s.
    deploy = {**deployment(tiny_model_dir("llama"), ttl=1.0),
              "supervise": {"heartbeat_s": 0.25, "unresponsive_s": 10.0, "kill_after_s": 60.0}}
    with serve(deploy, tmp_path, env={"HETPD_FAULTS": "decode:stall_on_offer=4"}) as served:
        text, tokens = complete(served)
        assert tokens == 10
        assert "expired" in served.log()
        served.wait_idle()


@pytest.mark.timeout(300)
def test_duplicate_and_late_lease_messages_change_nothing(tiny_model_dir: Callable[[str], Path],
                                                          tmp_path: Path) -> None:
    with serve(deployment(tiny_model_dir("llama")), tmp_path, env={}) as clean:
        expected = complete(clean)
    (tmp_path / "dup").mkdir()
    with serve(deployment(tiny_model_dir("llama")), tmp_path / "dup",
               env={"HETPD_FAULTS": "prefill:duplicate_lease_messages,decode:duplicate_lease_messages"}) as served:
        assert complete(served) == expected
        served.wait_idle()


@pytest.mark.timeout(300)
def test_a_full_decode_pool_answers_503_with_retry_after(tiny_model_dir: Callable[[str], Path],
                                                         tmp_path: Path) -> None:
    # 2 pages of 16 tokens: a 40-token prompt can never be reserved, and nothing may queue.
    with serve(deployment(tiny_model_dir("llama"), decode_blocks=2, max_queue=0), tmp_path) as served:
        body = {"model": "tiny", "prompt": " ".join(["w9"] * 40), "max_tokens": 4}
        request = urllib.request.Request(served.url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=60)
        assert caught.value.code == 503 and caught.value.headers["Retry-After"]
        assert "full" in json.loads(caught.value.read())["error"]["message"]
        assert complete(served, max_tokens=4)[1] == 4  # what fits still runs
        served.wait_idle()


@pytest.mark.timeout(300)
def test_a_dropped_control_connection_moves_the_request(tiny_model_dir: Callable[[str], Path],
                                                        tmp_path: Path) -> None:
    with serve(deployment(tiny_model_dir("llama"), decode_count=2), tmp_path,
               env={"HETPD_FAULTS": "decode-0:drop_router_after_tokens=2,decode-1:drop_router_after_tokens=2"}) as served:
        text, words = complete(served, max_tokens=6, stream=True)
        assert words == 6
        assert "left" in served.log()
        assert len(served.wait_idle()) == 2  # the cut-off decode worker left; the other two hold nothing


@pytest.mark.timeout(300)
def test_the_fail_policy_gives_a_clear_error(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    with serve(deployment(tiny_model_dir("llama"), recovery="fail"), tmp_path,
               env={"HETPD_FAULTS": "prefill:corrupt=*"}) as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=90)
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
        assert caught.value.status_code == 502 and "checksum" in str(caught.value)
        assert complete(served, max_tokens=4)[1] == 4  # the next request is fine
        served.wait_idle()
