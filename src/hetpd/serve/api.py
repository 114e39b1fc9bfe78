"""The OpenAI-compatible HTTP API in front of the router (FastAPI).

``/v1/completions`` and ``/v1/chat/completions`` (streaming as server-sent events, or not),
``/v1/models``, ``/health``, ``/metrics`` (Prometheus) and ``/v1/requests/{id}/trace`` (each
lifecycle step's wall-clock time). An optional API key guards ``/v1/*``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from hetpd.models.tokenizer import Tokenizer
from hetpd.sampling_params import SamplingParams
from hetpd.serve.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_body,
    chat_chunk,
    completion_body,
    error_body,
    usage,
)
from hetpd.serve.router import NotReady, Overloaded, RequestState, Router


class _TextStream:
    """Incremental detokenisation that never shows text a stop string may still cut."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.tokens: list[int] = []
        self.shown = ""
        self.holdback = max((len(s) for s in params.stop), default=1) - 1

    def add(self, token_ids: list[int]) -> str:
        self.tokens.extend(token_ids)
        text = self.tokenizer.decode(self.tokens, self.params.skip_special_tokens)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        ready = text[: len(text) - self.holdback] if self.holdback else text
        if not ready.startswith(self.shown) or len(ready) <= len(self.shown):
            return ""
        delta, self.shown = ready[len(self.shown):], ready
        return delta

    def finish(self, final_text: str | None) -> str:
        text = final_text if final_text is not None else self.tokenizer.decode(self.tokens, self.params.skip_special_tokens)
        if not text.startswith(self.shown):
            return ""
        delta, self.shown = text[len(self.shown):], text
        return delta


def build_app(router: Router, tokenizer: Tokenizer, model_name: str, api_key: str | None) -> FastAPI:
    app = FastAPI(title="hetpd", description="Heterogeneous prefill/decode serving")

    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id], False)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Response:
        request.state.arrived = time.time()  # a request's trace starts when its bytes reach us, not when parsed
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return JSONResponse(error_body("invalid or missing API key (Authorization: Bearer ...)",
                                               "authentication_error", code=401), status_code=401)
        response: Response = await call_next(request)
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors()]
        return JSONResponse(error_body("; ".join(problems), param=str(exc.errors()[0]["loc"][-1]), code=400),
                            status_code=400)

    @app.get("/health")
    async def health() -> JSONResponse:
        status = 200 if router.ready() else 503
        return JSONResponse({"status": "ok" if status == 200 else "starting",
                             "workers": {w.worker_id: w.role for w in router.workers.values()}}, status_code=status)

    @app.get("/v1/admin/workers")
    async def admin_workers() -> dict[str, Any]:
        """Each worker's latest stats: pages in use, live leases, transient bytes (hetpd extension)."""
        return {w.worker_id: {"role": w.role, "pool": w.pool, "assigned": len(w.assigned), **{
            k: v for k, v in w.stats.items() if k != "op"}} for w in router.workers.values()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(router.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "hetpd",
                                            "max_model_len": router.max_model_len()}]}

    @app.get("/v1/requests/{request_id}/trace")
    async def trace(request_id: str) -> JSONResponse:
        found = router.trace(request_id.removeprefix("chatcmpl-").removeprefix("cmpl-"))
        if found is None:
            return JSONResponse(error_body(f"no request {request_id!r} (traces of the last 10000 are kept)",
                                           "not_found_error", code=404), status_code=404)
        return JSONResponse(found)

    async def start(prompt_token_ids: list[int], params: SamplingParams, model: str,
                    arrived: float) -> RequestState | JSONResponse:
        if model != model_name:
            return JSONResponse(error_body(f"model {model!r} is not served here; use {model_name!r}", param="model",
                                           code=404), status_code=404)
        limit = router.max_model_len()
        if limit and len(prompt_token_ids) + params.max_tokens > limit:
            return JSONResponse(error_body(
                f"the prompt ({len(prompt_token_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                f"context length {limit}; shorten the prompt or lower max_tokens", param="max_tokens", code=400),
                status_code=400)
        if not prompt_token_ids:
            return JSONResponse(error_body("the prompt is empty", param="prompt", code=400), status_code=400)
        try:
            return await router.submit(prompt_token_ids, params, arrived)
        except Overloaded as exc:
            return JSONResponse(error_body(str(exc), "overloaded_error", code=503), status_code=503,
                                headers={"Retry-After": "1"})
        except NotReady as exc:
            return JSONResponse(error_body(str(exc), "service_unavailable", code=503), status_code=503,
                                headers={"Retry-After": "2"})

    async def events(state: RequestState) -> AsyncIterator[dict[str, Any]]:
        deadline = time.monotonic() + router.deploy.handoff.request_timeout_s
        while True:
            try:
                event = await asyncio.wait_for(state.events.get(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await router.abort(state.request_id)
                yield {"type": "error", "status": 504, "message": "request timed out"}
                return
            yield event
            if event["type"] in ("done", "error"):
                return

    def completion_logprobs(event: dict[str, Any], stream: _TextStream) -> dict[str, Any] | None:
        raw = event.get("logprobs")
        if not raw:
            return None
        return {"tokens": [token_text(t) for t, _, _ in raw], "token_logprobs": [lp for _, lp, _ in raw],
                "top_logprobs": [{token_text(t): lp for t, lp in top} for _, _, top in raw],
                "text_offset": [len(stream.shown)] * len(raw)}

    def chat_logprobs(event: dict[str, Any]) -> dict[str, Any] | None:
        raw = event.get("logprobs")
        if not raw:
            return None
        return {"content": [{"token": token_text(t), "logprob": lp, "bytes": list(token_text(t).encode()),
                             "top_logprobs": [{"token": token_text(a), "logprob": b,
                                               "bytes": list(token_text(a).encode())} for a, b in top]}
                            for t, lp, top in raw]}

    def sse(body: dict[str, Any]) -> str:
        return f"data: {json.dumps(body)}\n\n"

    def headers(state: RequestState) -> dict[str, str]:
        return {"X-Request-Id": state.request_id}

    async def respond(state: RequestState, params: SamplingParams, stream: bool, chat: bool) -> Response:
        text = _TextStream(tokenizer, params)
        prompt_tokens = len(state.prompt_token_ids)
        if not stream:
            pieces: list[str] = []
            all_logprobs: list[dict[str, Any]] = []
            async for event in events(state):
                if event["type"] == "tokens":
                    pieces.append(text.add(event["token_ids"]))
                    lp = chat_logprobs(event) if chat else completion_logprobs(event, text)
                    if lp:
                        all_logprobs.append(lp)
                elif event["type"] == "error":
                    return JSONResponse(error_body(event["message"], "server_error", code=event["status"]),
                                        status_code=event["status"], headers=headers(state))
                else:
                    pieces.append(text.finish(event["text"]))
                    used = usage(prompt_tokens, len(text.tokens))
                    merged = _merge_logprobs(all_logprobs, chat)
                    body = (chat_body(state.request_id, model_name, "".join(pieces), event["finish_reason"], merged, used)
                            if chat else completion_body(state.request_id, model_name, "".join(pieces),
                                                         event["finish_reason"], merged, used))
                    return JSONResponse(body, headers=headers(state))
            return JSONResponse(error_body("request ended without a result", "server_error"), status_code=500)

        async def stream_events() -> AsyncIterator[str]:
            finished = False
            try:
                if chat:
                    yield sse(chat_chunk(state.request_id, model_name, {"role": "assistant", "content": ""}, None))
                async for event in events(state):
                    if event["type"] == "error":
                        yield sse(error_body(event["message"], "server_error", code=event["status"]))
                        break
                    done = event["type"] == "done"
                    delta = text.finish(event["text"]) if done else text.add(event["token_ids"])
                    reason = event["finish_reason"] if done else None
                    used = usage(prompt_tokens, len(text.tokens)) if done else None
                    if chat:
                        lp = None if done else chat_logprobs(event)
                        yield sse(chat_chunk(state.request_id, model_name, {"content": delta} if delta or not done else {},
                                             reason, lp, used))
                    else:
                        lp = None if done else completion_logprobs(event, text)
                        yield sse(completion_body(state.request_id, model_name, delta, reason, lp, used, chunk=True))
                    finished = done
                yield "data: [DONE]\n\n"
            finally:
                if not finished:  # the client went away (or errored): free everything it held
                    await router.abort(state.request_id)

        return StreamingResponse(stream_events(), media_type="text/event-stream", headers=headers(state))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompt = tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        if any(t < 0 or t >= tokenizer.vocab_size for t in prompt):
            return JSONResponse(error_body(f"prompt token ids must be in [0, {tokenizer.vocab_size})", param="prompt",
                                           code=400), status_code=400)
        params = body.sampling_params(router.max_model_len() - len(prompt))
        state = await start(prompt, params, body.model, request.state.arrived)
        return state if isinstance(state, Response) else await respond(state, params, body.stream, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as exc:
            return JSONResponse(error_body(str(exc), param="messages", code=400), status_code=400)
        prompt = tokenizer.encode_chat(messages)
        params = body.sampling_params(max(1, router.max_model_len() - len(prompt)))
        state = await start(prompt, params, body.model, request.state.arrived)
        return state if isinstance(state, Response) else await respond(state, params, body.stream, chat=True)

    return app


def _merge_logprobs(parts: list[dict[str, Any]], chat: bool) -> dict[str, Any] | None:
    if not parts:
        return None
    if chat:
        return {"content": [item for p in parts for item in p["content"]]}
    merged: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in parts:
        for key in merged:
            merged[key].extend(p[key])
    return merged
