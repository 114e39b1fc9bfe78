"""A request's token state as the scheduler sees it. Pure Python, no torch."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from hetpd.core.block_allocator import BlockHash


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not holding blocks; (re)starts from the prefix cache
    RUNNING = "running"  # holds blocks for its computed tokens
    FINISHED = "finished"  # left the scheduler; holds no blocks the scheduler knows of


@dataclass(eq=False)
class Sequence:
    """One request's tokens, computed-token watermark and block table.

    Invariants while RUNNING: ``len(block_table) * block_size >= num_computed_tokens``;
    ``num_computed_tokens < num_tokens`` until the step that samples its next token;
    ``block_hashes[i]`` is the chained hash of block ``i`` for every registered full block.
    """

    seq_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    max_tokens: int
    arrival_index: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_cached_prompt_tokens: int = 0
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]
