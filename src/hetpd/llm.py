"""The offline Python API: ``LLM(model).generate(prompts, SamplingParams(...))``, as in vLLM."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

from hetpd.engine.config import EngineConfig
from hetpd.engine.engine import Engine
from hetpd.models.tokenizer import Message
from hetpd.outputs import RequestOutput
from hetpd.sampling_params import SamplingParams

# A prompt is text, a list of token ids, or {"prompt_token_ids": [...]} (vLLM's TokensPrompt).
Prompt = Union[str, Sequence[int], Mapping[str, Any]]
Progress = Callable[[int, int], None]


class LLM:
    """A colocated engine with a batch ``generate`` and ``chat``; loads the model on construction."""

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.engine = Engine.from_config(EngineConfig(model=model, **engine_args))
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        progress: Progress | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion (continuously batched); outputs in input order."""
        prompt_list = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompt_list))
        request_ids = []
        for prompt, p in zip(prompt_list, params):
            text, token_ids = self._tokenize(prompt)
            request_id = str(next(self._ids))
            self.engine.add_request(request_id, token_ids, p, prompt=text)
            request_ids.append(request_id)
        return self._run(request_ids, progress)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        progress: Progress | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations: list[Sequence[Message]]
        if messages and isinstance(messages[0], Mapping):
            conversations = [messages]  # type: ignore[list-item]
        else:
            conversations = list(messages)  # type: ignore[arg-type]
        tokenizer = self._require_tokenizer()
        prompts = [{"prompt_token_ids": tokenizer.encode_chat(c), "prompt": tokenizer.apply_chat_template(c)}
                   for c in conversations]
        return self.generate(prompts, sampling_params, progress)

    def _run(self, request_ids: list[str], progress: Progress | None) -> list[RequestOutput]:
        outputs: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            step = self.engine.step()
            if step.num_batched_tokens == 0 and not step.num_preempted:
                raise RuntimeError("the engine has queued requests but cannot schedule any (KV pool held elsewhere?)")
            for output in step.finished:
                outputs[output.request_id] = output
                if progress is not None:
                    progress(len(outputs), len(request_ids))
        return [outputs[request_id] for request_id in request_ids]

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self._require_tokenizer().encode(prompt)
        if isinstance(prompt, Mapping):
            if "prompt_token_ids" not in prompt:
                raise ValueError("a dict prompt needs 'prompt_token_ids'")
            return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
        return None, [int(t) for t in prompt]

    def _require_tokenizer(self) -> Any:
        if self.engine.tokenizer is None:
            raise ValueError("this model folder has no tokenizer.json: pass token ids instead of text")
        return self.engine.tokenizer


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, Mapping)):
        return [prompts]
    items: list[Any] = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # one prompt given as token ids
    return items


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling_params for {count} prompts")
    return list(params)
