"""The OpenAI-compatible HTTP API in front of the router (FastAPI).

``/v1/completions`` and ``/v1/chat/completions`` (streaming as server-sent events, or not),
``/v1/models``, ``/health``, ``/metrics`` (Prometheus) and ``/v1/requests/{id}/trace`` (each
lifecycle step's wall-clock time). An optional API key guards ``/v1/*`` and ``/metrics``.

Every request is checked against what the engine accepts before the router sees it, and refused
with a 4xx naming the field: no request reaches a worker that a worker would fail on. The event
loop stays free for every other client: tokenising and chat templates run in a thread (the
tokenizer releases the GIL there), and text too long to fit the context is refused by its size
before it is tokenised. The OpenAPI document states these rules (``/openapi.json``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hetpd.models.tokenizer import ChatTemplateError, Tokenizer, utf8_length
from hetpd.sampling_params import SEED_MAX, SEED_MIN, SamplingParams
from hetpd.serve.http_guard import install
from hetpd.serve.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    chat_body,
    chat_chunk,
    completion_body,
    error_body,
    usage,
)
from hetpd.serve.router import NotReady, Overloaded, RequestState, Router

DISCONNECT_POLL_S = 0.2  # how often a non-streaming request checks that its client is still there
MIN_LOGPROB = -9999.0  # what a -inf (or NaN) log-probability is reported as: JSON has no infinities (as vLLM)


class SafeJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an error message quoting client input that
    held a lone surrogate would make Starlette's UTF-8 rendering raise (a 500 instead of a 4xx)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


class Refused(Exception):
    """A request the API answers with a 4xx/5xx error body (raised by the checks, even in threads)."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers

    def response(self) -> SafeJSONResponse:
        return SafeJSONResponse(error_body(self.message, self.kind, self.param, self.status), status_code=self.status,
                                headers=self.headers)


def _finite(logprob: float) -> float:
    return logprob if logprob > MIN_LOGPROB else MIN_LOGPROB  # NaN fails the comparison too


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
    limits = router.deploy.router
    app = FastAPI(title="hetpd", description="Heterogeneous prefill/decode serving (OpenAI-compatible API)",
                  default_response_class=SafeJSONResponse)
    install(app, limits, api_key)
    vocab_size = tokenizer.vocab_size
    tokenizer.max_bytes_per_token  # noqa: B018 - computed once from the vocabulary, now rather than in a request

    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id], False)

    # ------------------------------------------------------------------ errors
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        if errors and errors[0]["type"] == "json_invalid":  # its location is a character offset, not a field
            error = errors[0]
            return Refused(400, f"the body is not valid JSON (at character {error['loc'][-1]}): "
                                f"{error.get('ctx', {}).get('error', error['msg'])}").response()
        problems = list(dict.fromkeys(f"{_location(e['loc'])}: {e['msg']}" for e in errors))
        field = _location(errors[0]["loc"]).split(".")[0].split("[")[0] if errors else None
        return Refused(400, "; ".join(problems) or "invalid request", field).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # Unknown paths, wrong methods, bodies that are not JSON: the same error body as the rest.
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return Refused(exc.status_code, str(exc.detail), kind=kind, headers=exc.headers).response()

    def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
        """OpenAPI responses for these refusals (401 only where a key is set)."""
        described = {400: "invalid request (the message names the field)", 401: "missing or wrong API key",
                     404: "no such model or request", 408: "the body did not arrive in time",
                     413: "the body is over the size limit", 503: "not ready or overloaded; retry after Retry-After"}
        return {s: {"model": ErrorResponse, "description": described[s]} for s in statuses if s != 401 or api_key}

    # ------------------------------------------------------------------ small endpoints
    @app.get("/health", responses=errors(503))
    async def health() -> Response:
        status = 200 if router.ready() else 503
        return SafeJSONResponse({"status": "ok" if status == 200 else "starting",
                                 "workers": {w.worker_id: w.role for w in router.workers.values()}}, status_code=status)

    @app.get("/v1/admin/workers", responses=errors(401))
    async def admin_workers() -> dict[str, Any]:
        """Each worker's latest stats: pages in use, live leases, transient bytes (hetpd extension)."""
        return {w.worker_id: {"role": w.role, "pool": w.pool, "assigned": len(w.assigned), **{
            k: v for k, v in w.stats.items() if k != "op"}} for w in router.workers.values()}

    @app.get("/v1/admin/requests", responses=errors(401))
    async def admin_requests() -> dict[str, Any]:
        """Requests in flight: tokens so far, workers, lifecycle steps (hetpd extension; a
        non-streaming request's id is otherwise only known once it answers)."""
        return {r.request_id: {"prompt_tokens": len(r.prompt_token_ids), "output_tokens": len(r.output_token_ids),
                               "workers": dict(r.workers), "steps": dict(r.trace)} for r in router.requests.values()}

    @app.get("/metrics", response_class=PlainTextResponse, responses={} if limits.metrics_public else errors(401))
    async def metrics() -> Response:
        return Response(router.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", responses=errors(401))
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "hetpd",
                                            "max_model_len": router.max_model_len()}]}

    @app.get("/v1/requests/{request_id}/trace", responses=errors(401, 404))
    async def trace(request_id: str) -> Response:
        found = router.trace(request_id.removeprefix("chatcmpl-").removeprefix("cmpl-"))
        if found is None:
            return Refused(404, f"no request {request_id!r} (traces of the last 10000 are kept)",
                           kind="not_found_error").response()
        return SafeJSONResponse(found)

    # ------------------------------------------------------------------ checks before the router
    def context_length(model: str) -> int:
        """The context length requests are checked against, once the model is the served one."""
        if model != model_name:
            raise Refused(404, f"model {model!r} is not served here; use {model_name!r}", "model", "not_found_error")
        if not router.ready():
            raise Refused(503, "no worker set can serve yet (waiting for prefill and decode workers to register)",
                          kind="service_unavailable", headers={"Retry-After": "2"})
        if (overloaded := router.refusal()) is not None:  # the queue would refuse it: spend no CPU tokenising it
            raise Refused(503, overloaded, kind="overloaded_error", headers={"Retry-After": "1"})
        return router.max_model_len()

    def tokenize(text: str, param: str, limit: int, add_special_tokens: bool) -> list[int]:
        """In a thread: the text's token ids, unless it cannot be text or cannot fit."""
        try:
            size = utf8_length(text)
        except UnicodeEncodeError as exc:
            raise Refused(400, f"{param} is not valid Unicode: a lone surrogate at character {exc.start}",
                          param) from None
        # Refused by size before tokenising: a prompt must leave one token of the context for output.
        most = tokenizer.max_text_bytes(limit - 1)
        if most is not None and size > most:
            raise Refused(400, f"{param} is {size} bytes of UTF-8: more than fits the context length {limit} (at "
                               f"most {tokenizer.max_bytes_per_token} bytes per token with this tokenizer, so "
                               f"{most} bytes leave no room for output)", param)
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def chat_prompt(messages: list[dict[str, str]], limit: int) -> list[int]:
        """In a thread: each message checked, the chat template rendered, the result tokenised."""
        for index, message in enumerate(messages):
            try:
                utf8_length(message["content"])
            except UnicodeEncodeError as exc:
                raise Refused(400, f"messages[{index}].content is not valid Unicode: a lone surrogate at character "
                                   f"{exc.start}", f"messages[{index}].content") from None
        try:
            text = tokenizer.apply_chat_template(messages)
        except ChatTemplateError as exc:
            raise Refused(400, f"messages: {exc}", "messages") from None
        return tokenize(text, "messages", limit, add_special_tokens=False)  # the template spells out BOS

    def token_ids(prompt: list[int], limit: int) -> list[int]:
        if len(prompt) >= limit:  # first: the range check below would walk a list of any length
            raise no_room(len(prompt), limit, "prompt")
        if any(t >= vocab_size for t in prompt):  # pydantic already refused negatives, bools and floats
            raise Refused(400, f"prompt token ids must be in [0, {vocab_size})", "prompt")
        return prompt

    def no_room(tokens: int, limit: int, param: str) -> Refused:
        return Refused(400, f"the prompt ({tokens} tokens) leaves no room for output in the context length {limit}; "
                            f"shorten the prompt", param)

    def sampling(body: CompletionRequest | ChatCompletionRequest, prompt: list[int], limit: int,
                 param: str) -> SamplingParams:
        for field in ("max_tokens", "max_completion_tokens"):  # the one not used is still checked
            value = getattr(body, field, None)
            if value is not None and value >= limit:
                raise Refused(400, f"{field} ({value}) exceeds the context length {limit}: with a prompt of one "
                                   f"token at least, at most {limit - 1} can be generated", field)
        if not prompt:
            raise Refused(400, "the prompt is empty (it has no tokens)", param)
        if len(prompt) >= limit:
            raise no_room(len(prompt), limit, param)
        try:
            params = body.sampling_params(limit - len(prompt))
        except ValueError as exc:  # a combination the fields' own checks let through
            raise Refused(400, str(exc)) from None
        if len(prompt) + params.max_tokens > limit:
            raise Refused(400, f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                               f"context length {limit}; shorten the prompt or lower max_tokens", "max_tokens")
        return params

    async def start(prompt: list[int], params: SamplingParams, arrived: float) -> RequestState:
        try:
            return await router.submit(prompt, params, arrived)
        except Overloaded as exc:
            raise Refused(503, str(exc), kind="overloaded_error", headers={"Retry-After": "1"}) from None
        except NotReady as exc:
            raise Refused(503, str(exc), kind="service_unavailable", headers={"Retry-After": "2"}) from None

    # ------------------------------------------------------------------ answers
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
        return {"tokens": [token_text(t) for t, _, _ in raw], "token_logprobs": [_finite(lp) for _, lp, _ in raw],
                "top_logprobs": [{token_text(t): _finite(lp) for t, lp in top} for _, _, top in raw],
                "text_offset": [len(stream.shown)] * len(raw)}

    def chat_logprobs(event: dict[str, Any]) -> dict[str, Any] | None:
        raw = event.get("logprobs")
        if not raw:
            return None
        return {"content": [{"token": token_text(t), "logprob": _finite(lp), "bytes": list(token_text(t).encode()),
                             "top_logprobs": [{"token": token_text(a), "logprob": _finite(b),
                                               "bytes": list(token_text(a).encode())} for a, b in top]}
                            for t, lp, top in raw]}

    def sse(body: dict[str, Any]) -> str:
        return f"data: {json.dumps(body)}\n\n"

    def headers(state: RequestState) -> dict[str, str]:
        return {"X-Request-Id": state.request_id}

    async def whole(state: RequestState, params: SamplingParams, chat: bool) -> Response:
        text = _TextStream(tokenizer, params)
        pieces: list[str] = []
        all_logprobs: list[dict[str, Any]] = []
        async for event in events(state):
            if event["type"] == "tokens":
                pieces.append(text.add(event["token_ids"]))
                lp = chat_logprobs(event) if chat else completion_logprobs(event, text)
                if lp:
                    all_logprobs.append(lp)
            elif event["type"] == "error":
                return SafeJSONResponse(error_body(event["message"], "server_error", code=event["status"]),
                                        status_code=event["status"], headers=headers(state))
            else:
                pieces.append(text.finish(event["text"]))
                used = usage(len(state.prompt_token_ids), len(text.tokens))
                merged = _merge_logprobs(all_logprobs, chat)
                body = (chat_body(state.request_id, model_name, "".join(pieces), event["finish_reason"], merged, used)
                        if chat else completion_body(state.request_id, model_name, "".join(pieces),
                                                     event["finish_reason"], merged, used))
                return SafeJSONResponse(body, headers=headers(state))
        return SafeJSONResponse(error_body("request ended without a result", "server_error"), status_code=500)

    async def unless_gone(state: RequestState, params: SamplingParams, chat: bool, request: Request) -> Response:
        """The whole answer, or, if the client disconnects first, the request aborted on every
        worker (pages and leases freed) instead of generated for nobody."""
        result = asyncio.ensure_future(whole(state, params, chat))
        try:
            while True:
                done, _ = await asyncio.wait({result}, timeout=DISCONNECT_POLL_S)
                if done:
                    return result.result()
                if await request.is_disconnected():
                    await router.abort(state.request_id)
                    return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        finally:
            result.cancel()

    def streamed(state: RequestState, params: SamplingParams, chat: bool) -> Response:
        text = _TextStream(tokenizer, params)
        prompt_tokens = len(state.prompt_token_ids)

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

    async def answer(prompt: list[int], params: SamplingParams, stream: bool, chat: bool, request: Request) -> Response:
        state = await start(prompt, params, request.state.arrived)
        return streamed(state, params, chat) if stream else await unless_gone(state, params, chat, request)

    generation = {200: {"description": "the completion (JSON), or with stream=true server-sent events",
                        "content": {"text/event-stream": {"schema": {}}}},
                  **errors(400, 401, 404, 408, 413, 503)}

    @app.post("/v1/completions", responses=generation)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        try:
            limit = context_length(body.model)
            if isinstance(body.prompt, str):
                prompt = await asyncio.to_thread(tokenize, body.prompt, "prompt", limit, True)
            else:
                prompt = token_ids(body.prompt, limit)
            params = sampling(body, prompt, limit, "prompt")
            return await answer(prompt, params, bool(body.stream), False, request)
        except Refused as refused:
            return refused.response()

    @app.post("/v1/chat/completions", responses=generation)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        try:
            limit = context_length(body.model)
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            prompt = await asyncio.to_thread(chat_prompt, messages, limit)
            params = sampling(body, prompt, limit, "messages")
            return await answer(prompt, params, bool(body.stream), True, request)
        except Refused as refused:
            return refused.response()

    # ------------------------------------------------------------------ the OpenAPI document
    def openapi() -> dict[str, Any]:
        """FastAPI's document plus what only the running deployment knows, so that it states
        exactly what is accepted: the served model's name, the vocabulary's token id range, the
        context length's bound on max_tokens, the API key, and 400 (not 422) for invalid bodies."""
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _state_runtime_limits(schema, model_name, vocab_size, router.max_model_len() if router.ready() else None)
        if api_key:
            _state_api_key(schema, metrics_public=limits.metrics_public)
        if router.ready():  # the context length is known once workers joined: the document is final
            app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _location(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as a field path (``messages[0].content``), without the names
    pydantic gives the branches of a union (``constrained-str``, ``list[...]``, ``TextPart``)."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "body" and not _is_union_branch(part):
            path += f".{part}" if path else part
    return path or "body"


def _is_union_branch(part: str) -> bool:
    # Field names here are snake_case identifiers; branch tags are types or have '-' or '['.
    return "[" in part or "-" in part or part[:1].isupper() or part in ("str", "int", "float", "bool", "list", "dict")


def _state_runtime_limits(schema: dict[str, Any], model_name: str, vocab_size: int, context: int | None) -> None:
    components = schema.get("components", {}).get("schemas", {})
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        properties = components.get(name, {}).get("properties", {})
        if "model" in properties:
            properties["model"] = {**properties["model"], "type": "string", "enum": [model_name]}
        for field in ("max_tokens", "max_completion_tokens"):
            for branch in properties.get(field, {}).get("anyOf", []):
                if branch.get("type") == "integer" and context:
                    branch["maximum"] = context - 1  # a prompt has at least one token
        for branch in properties.get("seed", {}).get("anyOf", []):
            if branch.get("type") == "integer":  # FastAPI's document has them as floats: 2**63 - 1 became 2**63
                branch.update(minimum=SEED_MIN, maximum=SEED_MAX)
        for branch in properties.get("prompt", {}).get("anyOf", []):
            if branch.get("type") == "array":
                branch["items"] = {**branch.get("items", {}), "maximum": vocab_size - 1}
                if context:
                    branch["maxItems"] = context - 1  # room for one output token
    # Invalid bodies are 400 with the error body (RequestValidationError's handler), never 422.
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            responses.pop("422", None)
            for status, response in responses.items():
                content = response.get("content", {})
                if not status.startswith("2") and "text/plain" in content:  # /metrics' refusals are JSON too
                    content["application/json"] = content.pop("text/plain")


def _state_api_key(schema: dict[str, Any], metrics_public: bool) -> None:
    schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in schema.get("paths", {}).items():
        if path.startswith("/v1/") or (path == "/metrics" and not metrics_public):
            for operation in operations.values():
                operation["security"] = [{"bearer": []}]


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
