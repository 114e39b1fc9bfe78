"""One streamed request to an OpenAI-compatible server, timed token by token.

Works the same against hetpd, vLLM or SGLang: it sends ``/v1/completions`` with the prompt as
token ids (exact input lengths), ``max_tokens`` and ``ignore_eos`` (exact output lengths where
the server honours it), ``stream: true``, and reads the server-sent events. Times are wall-clock
(``time.time()``), so they line up with a server's own traces on the same host.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True)
class RequestResult:
    """What one request did, as the client saw it. ``error_kind`` is None exactly when ``ok``."""

    index: int
    ok: bool
    scheduled: float  # when the workload wanted it sent (wall clock)
    sent: float
    end: float
    input_tokens: int
    output_tokens: int
    first_token: float | None = None
    token_times: tuple[float, ...] = ()  # arrival of each chunk that carried text
    error_kind: str | None = None  # "http_4xx" | "http_5xx" | "connection" | "timeout" | "stream"
    error: str | None = None
    server_request_id: str | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent

    @property
    def e2e(self) -> float:
        return self.end - self.sent

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (last - first) / (tokens - 1)."""
        if self.first_token is None or self.output_tokens < 2 or not self.token_times:
            return None
        return (self.token_times[-1] - self.first_token) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        """Every gap between consecutive token-bearing chunks."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def send_lag(self) -> float:
        """How late the client sent it: the load generator's own overhead."""
        return self.sent - self.scheduled


async def send_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int,
                       index: int, scheduled: float, api_key: str | None = None,
                       timeout: float = 600.0) -> RequestResult:
    """Send one streaming completion; never raises for server or network trouble (it is in the result)."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    sent = time.time()
    times: list[float] = []
    usage_tokens: int | None = None
    request_id: str | None = None

    def failed(kind: str, message: str) -> RequestResult:
        return RequestResult(index, False, scheduled, sent, time.time(), len(prompt), len(times),
                             times[0] if times else None, tuple(times), kind, message, request_id)

    try:
        async with client.stream("POST", url.rstrip("/") + "/v1/completions", json=body, headers=headers,
                                 timeout=timeout) as response:
            request_id = response.headers.get("x-request-id")
            if response.status_code >= 400:
                text = (await response.aread()).decode(errors="replace")[:500]
                kind = "http_4xx" if response.status_code < 500 else "http_5xx"
                return failed(kind, f"HTTP {response.status_code}: {text}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.time()
                chunk = json.loads(data)
                if "error" in chunk:
                    return failed("stream", str(chunk["error"].get("message", chunk["error"])))
                if any(choice.get("text") for choice in chunk.get("choices") or []):
                    times.append(now)
                if chunk.get("usage"):
                    usage_tokens = int(chunk["usage"].get("completion_tokens", 0))
    except httpx.TimeoutException as exc:
        return failed("timeout", f"timed out: {exc}")
    except (httpx.TransportError, OSError) as exc:
        return failed("connection", f"{type(exc).__name__}: {exc}")
    except ValueError as exc:
        return failed("stream", f"malformed server-sent event: {exc}")
    output_tokens = usage_tokens if usage_tokens is not None else len(times)
    return RequestResult(index, True, scheduled, sent, time.time(), len(prompt), output_tokens,
                         times[0] if times else None, tuple(times), server_request_id=request_id)
