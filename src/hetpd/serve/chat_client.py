"""``hetpd chat``: talk to a running hetpd (or any OpenAI-compatible) server from the terminal.

Streams the answer as it is generated, keeps the conversation, and shows the time to first
token and the decode rate after each reply. ``/reset`` starts over, ``/quit`` (or EOF) leaves.
Standard library only.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any, TextIO


def _request(url: str, api_key: str | None, body: dict[str, Any] | None = None) -> urllib.request.Request:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    return urllib.request.Request(url, data=data, headers=headers)


def first_model(base: str, api_key: str | None) -> str:
    with urllib.request.urlopen(_request(f"{base}/v1/models", api_key), timeout=30) as response:
        return str(json.loads(response.read())["data"][0]["id"])


def stream_chat(base: str, api_key: str | None, model: str, messages: list[dict[str, str]],
                max_tokens: int, temperature: float) -> Iterator[str]:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature, "stream": True}
    with urllib.request.urlopen(_request(f"{base}/v1/chat/completions", api_key, body), timeout=300) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    yield content


def run(base: str, api_key: str | None, model: str | None, max_tokens: int, temperature: float,
        stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    base = base.rstrip("/")
    try:
        model = model or first_model(base, api_key)
    except (urllib.error.URLError, OSError) as exc:
        print(f"hetpd chat: cannot reach {base}: {exc}", file=sys.stderr)
        return 2
    print(f"chatting with {model} at {base}  (/reset, /quit)", file=stdout, flush=True)
    messages: list[dict[str, str]] = []
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            return 0
        if line.strip() == "/reset":
            messages = []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        print("assistant> ", end="", file=stdout, flush=True)
        started, first, pieces = time.monotonic(), None, []
        try:
            for piece in stream_chat(base, api_key, model, messages, max_tokens, temperature):
                first = first or time.monotonic()
                pieces.append(piece)
                print(piece, end="", file=stdout, flush=True)
        except (urllib.error.HTTPError, RuntimeError) as exc:
            detail = exc.read().decode() if isinstance(exc, urllib.error.HTTPError) else str(exc)
            print(f"\n[error: {detail}]", file=stdout, flush=True)
            messages.pop()
            continue
        done = time.monotonic()
        ttft = (first or done) - started
        print(f"\n[{len(pieces)} chunks, first token {ttft * 1000:.0f} ms, {done - started:.2f} s]", file=stdout,
              flush=True)
        messages.append({"role": "assistant", "content": "".join(pieces)})
