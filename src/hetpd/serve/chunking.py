"""How many prompt tokens a worker's engine step may take, sized by a latency target.

On a slow device one prompt chunk of ``max_num_batched_tokens`` can run for seconds, during
which every decode sequence batched with it waits. With ``max_step_s`` set on a pool, the
worker measures its own steps and keeps the prompt budget at what fits the target on this
device, within [``MIN_TOKENS``, the pool's ``max_num_batched_tokens``]. Pure Python.
"""

from __future__ import annotations

import math

MIN_TOKENS = 16


class ChunkSizer:
    """Tracks prompt tokens per second from the steps observed; answers the next budget."""

    def __init__(self, target_s: float, max_tokens: int) -> None:
        if target_s <= 0 or max_tokens < MIN_TOKENS:
            raise ValueError(f"ChunkSizer needs target_s > 0 and max_tokens >= {MIN_TOKENS}, "
                             f"got {target_s}, {max_tokens}")
        self.target_s = target_s
        self.max_tokens = max_tokens
        self.budget = max_tokens

    def observe(self, prompt_tokens: int, wall_s: float) -> int:
        """A step ran ``prompt_tokens`` prompt tokens in ``wall_s`` seconds: the next budget.

        Moves halfway (geometrically) toward what this step's rate says fits the target, so one
        noisy step does not swing it; attention grows with the context, so later chunks of a
        long prompt run slower and the budget follows them down."""
        if prompt_tokens <= 0 or wall_s <= 0:
            return self.budget
        fits = prompt_tokens * self.target_s / wall_s
        self.budget = int(min(self.max_tokens, max(MIN_TOKENS, math.sqrt(self.budget * fits))))
        return self.budget
