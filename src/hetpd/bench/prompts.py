"""Prompts of exact token lengths, with shared prefixes where the workload says so.

A benchmark replays *lengths* (a trace's, or drawn ones) on a model with its own tokenizer, so
prompts are built as token ids, never as text: a prompt of ``input_tokens`` ids is exactly that
long on the server (the completions API takes token ids). Pure Python (no torch).

Invariants of :meth:`PromptBuilder.build`:

- exactly ``spec.input_tokens`` ids, all in ``[0, vocab_size)`` and none in ``special_ids``;
- requests with equal leading ``prefix_ids`` have equal leading tokens, block for block: each
  prefix id maps to one block of ``block_tokens`` ids, chosen by a seeded hash of the id (never
  Python's ``hash``, which changes between runs), so a server's prefix cache sees what the trace
  shared. Set ``block_tokens`` to the trace's block size (Mooncake: 512);
- the rest of a prompt (all of it without prefix ids) is unique to the request, drawn from a
  stream seeded by its index, so unrelated requests share no prefix by accident;
- the same builder arguments always give the same prompts; a different ``salt`` changes the
  unique parts only (a sweep's runs and its warm-up each use their own, so no run finds another
  run's prompts in the server's prefix cache).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from hetpd.bench.workload import RequestSpec

# Blocks kept per builder; past it the cache starts over (a trace's hot prefixes come back
# soon, and a rebuilt block is identical, only slower).
_MAX_CACHED_BLOCKS = 4096


class PromptBuilder:
    """Builds prompts (token ids) for :class:`RequestSpec`\\ s; see the module docstring."""

    def __init__(self, vocab_size: int, special_ids: frozenset[int] = frozenset(),
                 decode: Callable[[list[int]], str] | None = None, block_tokens: int = 512, seed: int = 0,
                 salt: str = "") -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        special = frozenset(special_ids)
        self._allowed = [t for t in range(vocab_size) if t not in special]
        if not self._allowed:
            raise ValueError(f"special_ids: all {vocab_size} ids of the vocabulary are special; no token is left for prompts")
        self.vocab_size = vocab_size
        self.special_ids = special
        self.block_tokens = block_tokens
        self.seed = seed
        self.salt = salt
        self._decode = decode
        self._blocks: dict[int, list[int]] = {}

    def block(self, prefix_id: int) -> list[int]:
        """The ``block_tokens`` ids that prefix id ``prefix_id`` stands for."""
        cached = self._blocks.get(prefix_id)
        if cached is None:
            if len(self._blocks) >= _MAX_CACHED_BLOCKS:
                self._blocks.clear()
            # str seeds go through SHA-512 in random.Random: stable across runs and processes.
            rng = random.Random(f"hetpd-prefix:{self.seed}:{prefix_id}")
            cached = self._blocks[prefix_id] = rng.choices(self._allowed, k=self.block_tokens)
        return cached

    def build(self, spec: RequestSpec) -> list[int]:
        """Exactly ``spec.input_tokens`` ids: the prefix blocks, cut to length, then unique ids."""
        if spec.input_tokens < 1:
            raise ValueError(f"request {spec.index}: input_tokens must be >= 1, got {spec.input_tokens}")
        tokens: list[int] = []
        for prefix_id in spec.prefix_ids:
            if len(tokens) >= spec.input_tokens:
                break
            tokens.extend(self.block(prefix_id))
        del tokens[spec.input_tokens:]
        missing = spec.input_tokens - len(tokens)
        if missing:
            key = f"hetpd-request:{self.seed}:{spec.index}" + (f":{self.salt}" if self.salt else "")
            rng = random.Random(key)
            tokens.extend(rng.choices(self._allowed, k=missing))
        return tokens

    def text(self, spec: RequestSpec) -> str:
        """The prompt as text, for chat endpoints that take no token ids. The server re-tokenizes
        it, and a decode/encode round trip may merge or split tokens (and a chat template adds
        its own), so the length the server sees is close to, not exactly, ``input_tokens``."""
        if self._decode is None:
            raise ValueError("PromptBuilder(decode=...) was not given, so prompts exist as token ids only")
        return self._decode(self.build(spec))
