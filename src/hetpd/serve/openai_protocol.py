"""OpenAI-compatible request bodies (validated) and response builders. Pure Python (no torch).

The request models are the API's contract: FastAPI serves their JSON schema in the OpenAPI
document, so every rule the server enforces on a field is declared on it here, where a client
(or a fuzzer) can read it. Numbers are strict: JSON ``true`` is not 1, ``1.5`` is not a token
id and ``"7"`` is not a seed (``8.0`` is 8: JSON Schema counts it an integer). What only the
running deployment knows (the served model's name, the vocabulary size, the context length)
is added to the schema by the API (:func:`hetpd.serve.api.build_app`) and checked there.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from hetpd.sampling_params import MAX_LOGPROBS, SEED_MAX, SEED_MIN, SamplingParams

MAX_API_TEMPERATURE = 2.0  # OpenAI's bound; SamplingParams allows more for offline use
DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI and vLLM


def _encodable(text: str) -> str:
    """JSON can carry a lone surrogate (``"\\ud800"``), which no UTF-8 text (nor tokenizer) holds."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode: a lone surrogate at character {exc.start}") from None
    return text


def _integral(value: Any) -> Any:
    """JSON Schema counts 8.0 as an integer (a number with no fraction), so the API does too."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Int fields take JSON integers and integral numbers, never booleans, strings or fractions.
Integral = BeforeValidator(_integral)
TokenCount = Annotated[int, Field(strict=True, ge=1), Integral]
Seed = Annotated[int, Field(strict=True, ge=SEED_MIN, le=SEED_MAX), Integral]
Choices = Annotated[int, Field(strict=True), Integral]
LogprobCount = Annotated[int, Field(strict=True, ge=0, le=MAX_LOGPROBS), Integral]
# Token ids are at least 0 here; the vocabulary's bound is the running model's (added by the API).
TokenId = Annotated[int, Field(strict=True, ge=0), Integral]
StrictBool = Annotated[bool, Field(strict=True)]
StopString = Annotated[str, Field(min_length=1), AfterValidator(_encodable)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # like vLLM: unknown OpenAI fields are ignored

    model: str = Field(description="the served model's name (GET /v1/models)")
    max_tokens: TokenCount | None = Field(
        None, description="tokens to generate at most; the prompt plus these must fit the context length")
    temperature: Annotated[float, Field(strict=True, ge=0.0, le=MAX_API_TEMPERATURE, allow_inf_nan=False)] | None = \
        Field(None, description="0 (or below 1e-5) is greedy; default 1")
    top_p: Annotated[float, Field(strict=True, gt=0.0, le=1.0, allow_inf_nan=False)] | None = Field(
        None, description="nucleus sampling; default 1 (off)")
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    seed: Seed | None = Field(
        None, description="int64, as OpenAI's: a seeded request draws the same tokens whatever its batch")
    stream: StrictBool | None = False
    n: Choices | None = Field(1, json_schema_extra={"minimum": 1, "maximum": 1}, description="only 1")
    ignore_eos: StrictBool = False  # vLLM's extension: generate exactly max_tokens (what load generators send)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only n=1 is supported")
        return value

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def _params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p, stop=self.stops(), seed=self.seed,
                              logprobs=logprobs, ignore_eos=self.ignore_eos)


def _room(room: int) -> int:
    if room < 1:  # the API refuses such a prompt first; a default of 0 or less tokens is never made
        raise ValueError(f"no room for output: {room} tokens of context left after the prompt")
    return room


class CompletionRequest(_Request):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)] = Field(
        description="text, or token ids of the served model's vocabulary")
    logprobs: LogprobCount | None = None
    echo: StrictBool | None = Field(False, json_schema_extra={"enum": [False, None]}, description="not supported")

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("echo is not supported")
        return value

    def sampling_params(self, room: int) -> SamplingParams:
        """``room``: the context length less the prompt (at least 1)."""
        max_tokens = self.max_tokens or min(DEFAULT_COMPLETION_TOKENS, _room(room))
        return self._params(max_tokens, self.logprobs)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"] = Field(description="only text parts are supported")
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: TokenCount | None = None
    logprobs: StrictBool | None = False
    top_logprobs: LogprobCount | None = None

    def sampling_params(self, room: int) -> SamplingParams:
        """``room``: the context length less the prompt (at least 1); the default max_tokens."""
        max_tokens = self.max_completion_tokens or self.max_tokens or _room(room)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._params(max_tokens, logprobs)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | None = None


class ErrorResponse(BaseModel):
    """Every refusal's body, as OpenAI's: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request_id: str, model: str, text: str, finish_reason: str | None,
                    logprobs: dict[str, Any] | None, usage_: dict[str, int] | None, chunk: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": f"cmpl-{request_id}", "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}],
    }
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def chat_body(request_id: str, model: str, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None,
              usage_: dict[str, int]) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                     "logprobs": logprobs}],
        "usage": usage_,
    }


def chat_chunk(request_id: str, model: str, delta: dict[str, Any], finish_reason: str | None,
               logprobs: dict[str, Any] | None = None, usage_: dict[str, int] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk", "created": int(time.time()),
        "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}],
    }
    if usage_ is not None:
        body["usage"] = usage_
    return body
