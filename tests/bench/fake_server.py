"""A minimal OpenAI-style streaming server with known delays, independent of hetpd's serving code.

Run as a script: ``python fake_server.py TTFT_MS ITL_MS [SLOW_EVERY SLOW_TTFT_MS]``; it prints
``PORT <n>`` once listening. Every request streams ``max_tokens`` tokens: the first after TTFT
(or SLOW_TTFT for every SLOW_EVERY-th request), then one every ITL. ``max_tokens == 999``
answers HTTP 400, so error accounting can be checked too.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import sys
import time
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse


def build(ttft: float, itl: float, slow_every: int, slow_ttft: float) -> FastAPI:
    app = FastAPI()
    counter = itertools.count()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await request.json()
        n = next(counter)
        if body["max_tokens"] == 999:
            return JSONResponse({"error": {"message": "max_tokens too large"}}, status_code=400)
        first = slow_ttft if slow_every and n % slow_every == slow_every - 1 else ttft
        start = time.monotonic()

        async def stream() -> AsyncIterator[str]:
            for i in range(body["max_tokens"]):
                due = start + first + i * itl
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                yield "data: " + json.dumps({"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}) + "\n\n"
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
            yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"X-Request-Id": f"fake-{n}"})

    return app


def main() -> None:
    ttft, itl = float(sys.argv[1]) / 1000, float(sys.argv[2]) / 1000
    slow_every = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    slow_ttft = float(sys.argv[4]) / 1000 if len(sys.argv) > 4 else ttft
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(uvicorn.Config(build(ttft, itl, slow_every, slow_ttft), log_level="warning"))
    asyncio.run(server.serve(sockets=[sock]))


if __name__ == "__main__":
    main()
