"""Tokenizer and chat template from an HF folder, without transformers.

``tokenizer.json`` is run by the ``tokenizers`` library (post-processor included, so BOS is
added exactly when HF would); the chat template from ``tokenizer_config.json`` is rendered
with a sandboxed jinja2 environment, as HF does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
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

    @functools.cached_property
    def max_bytes_per_token(self) -> int | None:
        """At most how many bytes of UTF-8 input one token stands for; None when unbounded.

        With it, text of more than ``n * max_bytes_per_token`` bytes is known to need more than
        ``n`` tokens without tokenising it (:meth:`max_text_bytes`). See :func:`bytes_per_token_bound`."""
        return bytes_per_token_bound(json.loads(self.backend.to_str()))

    def max_text_bytes(self, num_tokens: int) -> int | None:
        """The longest UTF-8 text (bytes) that can tokenise to ``num_tokens`` or fewer; None if unbounded."""
        per_token = self.max_bytes_per_token
        return None if per_token is None else num_tokens * per_token

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (the ids ``backend.encode`` gives), without holding the GIL.

        ``tokenizers``' ``encode`` holds the GIL for the whole call (a 4 MB text: about 2 s in
        which no other thread of the process runs), while its batch methods release it; so a
        server can run this in a thread and keep serving. ``encode_batch_fast`` skips the
        offsets nobody here reads. Raises TypeError for text that is not valid Unicode (a lone
        surrogate): check with :func:`utf8_length` first where that matters."""
        encoded = self.backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)
        return list(encoded[0].ids)

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


def utf8_length(text: str) -> int:
    """Bytes of ``text`` in UTF-8; raises UnicodeEncodeError for a lone surrogate (which JSON's
    ``"\\ud800"`` can carry but no tokenizer can take)."""
    return len(text.encode("utf-8"))


# How many times fewer UTF-8 bytes a normalizer can leave than it was given, per kind. Unicode
# normal forms: NFKC maps some 4-byte characters to 1-byte ones (U+1D400 MATHEMATICAL BOLD A ->
# "A"), NFC composes at most 9 bytes into 3 (Hangul L+V+T); lowercasing maps the 3-byte Kelvin
# sign to "k". Prepend only adds. Other normalizers (Strip, StripAccents, BertNormalizer,
# Precompiled, regex Replace, ...) can delete any amount of text: no bound.
_NORMALIZER_SHRINK = {"NFC": 4.0, "NFD": 4.0, "NFKC": 4.0, "NFKD": 4.0, "Lowercase": 3.0, "Prepend": 1.0}
# Pre-tokenizers that keep every character (they only split, or map spaces to a visible mark).
# Whitespace, WhitespaceSplit, BertPreTokenizer and CharDelimiterSplit drop characters: no bound.
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Digits", "Metaspace", "UnicodeScripts", "Split", "Punctuation"}


def _parts(component: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    if component is None:
        return []
    if component.get("type") == "Sequence":
        return [p for part in component.get(key, []) for p in _parts(part, key)]
    return [component]


def _shrink(normalizer: dict[str, Any] | None) -> float | None:
    """How many times fewer bytes the normalizer can leave (>= 1), or None if it can delete text."""
    factor = 1.0
    for part in _parts(normalizer, "normalizers"):
        kind = part.get("type")
        if kind == "Replace":
            pattern, content = part.get("pattern", {}).get("String"), part.get("content", "")
            if not pattern or not content:  # a regex, or replacing with nothing: unbounded
                return None
            factor *= max(1.0, len(pattern.encode()) / len(content.encode()))
        elif kind in _NORMALIZER_SHRINK:
            factor *= _NORMALIZER_SHRINK[kind]
        elif kind != "ByteLevel":
            return None
    return factor


def bytes_per_token_bound(spec: dict[str, Any]) -> int | None:
    """At most how many UTF-8 bytes of input one token can cover, from ``tokenizer.json``; None
    when a single token can cover unboundedly many (so no length of text is too long to fit).

    A bound exists when every input byte ends up in a token and a token covers no more than
    its own text: a BPE model where each symbol is in the vocabulary (byte-level with all 256
    byte symbols, byte fallback with all 256 ``<0xNN>`` tokens) or becomes one unknown token,
    no normalizer or pre-tokenizer that deletes characters, and no added token that strips the
    whitespace around it. Then a token covers at most its longest vocabulary entry (counted in
    bytes: a byte-level symbol is one byte), times what normalization can shrink the text by.
    Word-level and word-piece models map any unknown word, however long, to one token."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None
    shrink = _shrink(spec.get("normalizer"))
    pre_tokenizers = _parts(spec.get("pre_tokenizer"), "pretokenizers")
    if shrink is None or any(p.get("type") not in _KEEPING_PRE_TOKENIZERS or p.get("behavior") == "Removed"
                             for p in pre_tokenizers):
        return None
    added = spec.get("added_tokens") or []
    if any(token.get("lstrip") or token.get("rstrip") for token in added):
        return None
    vocab: dict[str, int] = model.get("vocab") or {}
    # A symbol missing from the vocabulary becomes the unknown token, one per symbol, unless
    # fuse_unk merges a run of them into one; without an unknown token it is silently dropped.
    unknown_is_one_token = model.get("unk_token") is not None and not model.get("fuse_unk")
    byte_level = any(p.get("type") == "ByteLevel" for p in pre_tokenizers + _parts(spec.get("normalizer"), "normalizers"))
    if byte_level:
        from tokenizers.pre_tokenizers import ByteLevel

        if not (unknown_is_one_token or set(ByteLevel.alphabet()) <= vocab.keys()):
            return None
        longest = max((len(token) for token in vocab), default=1)  # one symbol per input byte
    elif unknown_is_one_token or (model.get("byte_fallback") and all(f"<0x{b:02X}>" in vocab for b in range(256))):
        longest = max([4] + [len(token.encode()) for token in vocab])  # an unknown character: up to 4 bytes
    else:
        return None
    longest = max([longest] + [len(str(token.get("content", "")).encode()) for token in added])
    return math.ceil(longest * shrink)
