"""Tokenizer and chat template from an HF folder, without transformers.

``tokenizer.json`` is run by the ``tokenizers`` library (post-processor included, so BOS is
added exactly when HF would); the chat template from ``tokenizer_config.json`` is rendered
with a sandboxed jinja2 environment, as HF does.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

Message = Mapping[str, Any]


class ChatTemplateError(ValueError):
    pass


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        content = value.get("content")
        return str(content) if content is not None else None
    return None if value is None else str(value)


class Tokenizer:
    """Encode, decode, and render chat prompts for one model folder."""

    def __init__(self, backend: HFTokenizer, tokenizer_config: Mapping[str, Any]) -> None:
        self.backend = backend
        self.chat_template: str | None = tokenizer_config.get("chat_template")
        self.bos_token = _token_text(tokenizer_config.get("bos_token"))
        self.eos_token = _token_text(tokenizer_config.get("eos_token"))
        self.eos_token_id = backend.token_to_id(self.eos_token) if self.eos_token else None

    @classmethod
    def from_dir(cls, model_dir: Path) -> Tokenizer:
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"model folder {model_dir} has no tokenizer.json (text prompts need one)")
        config_path = Path(model_dir) / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # HF allows named templates; use the default one
            named = {t.get("name"): t.get("template") for t in template}
            config["chat_template"] = named.get("default")
        jinja_path = Path(model_dir) / "chat_template.jinja"
        if not config.get("chat_template") and jinja_path.is_file():
            config["chat_template"] = jinja_path.read_text()
        return cls(HFTokenizer.from_file(str(path)), config)

    @functools.cached_property
    def content_hash(self) -> str:
        """Hash of the vocabulary and merges: KV computed with another tokenizer means other tokens."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` into the model's prompt text (not tokenised)."""
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template (tokenizer_config.json: chat_template)")
        for index, message in enumerate(messages):
            if "role" not in message or "content" not in message:
                raise ChatTemplateError(f"messages[{index}] needs 'role' and 'content'")

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            template = env.from_string(self.chat_template)
            return template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as error:
            raise ChatTemplateError(f"chat template failed: {error}") from error

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        # The template already spells out special tokens; adding them again would double BOS.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)
