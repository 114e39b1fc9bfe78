"""Continuous-batching scheduler: admission by free blocks, chunked prefill under a token
budget, preemption by recompute. Pure Python, no torch.

One call to :meth:`Scheduler.schedule` picks the work of one model step. Running sequences
go first (in admission order), each taking either its one decode token or the next chunk
of its prompt; waiting sequences are admitted after them while the token budget, the
sequence limit and the free blocks allow. When a running sequence cannot get a block, the
most recently admitted running sequence is preempted: its blocks are released (full ones
stay in the prefix cache) and it goes back to the front of the queue to be recomputed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from hetpd.core.block_allocator import BlockAllocator, hash_block
from hetpd.core.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute tokens ``[start, start + num_tokens)`` of ``seq`` in this step.

    ``samples`` is true when the chunk reaches the end of the known tokens, so the step
    produces the sequence's next token."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[Sequence, ...]

    @property
    def num_batched_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    """Owns the waiting and running queues and every block a running sequence holds."""

    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator) -> None:
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._arrivals = 0

    # ------------------------------------------------------------------ admission
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; it gets blocks when :meth:`schedule` admits it."""
        if seq.num_tokens == 0:
            raise ValueError(f"sequence {seq.seq_id} has no tokens")
        if self.allocator.blocks_for_tokens(seq.num_prompt_tokens + seq.max_tokens) > self.allocator.num_blocks:
            raise ValueError(
                f"sequence {seq.seq_id} needs {seq.num_prompt_tokens + seq.max_tokens} tokens of KV, more than the "
                f"whole pool ({self.allocator.num_blocks} blocks of {self.allocator.block_size}); "
                "lower max_tokens or raise num_kv_blocks"
            )
        seq.arrival_index = self._next_arrival()
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def can_add_running(self) -> bool:
        return len(self.running) < self.config.max_num_seqs

    def add_running(self, seq: Sequence) -> None:
        """Adopt a sequence whose blocks the caller already reserved and filled (a KV import).

        The caller must have set ``block_table`` to cover ``num_computed_tokens`` and checked
        :meth:`can_add_running`."""
        if not self.can_add_running():
            raise RuntimeError("running set is full; check can_add_running() first")
        if self.allocator.blocks_for_tokens(seq.num_computed_tokens) > len(seq.block_table):
            raise RuntimeError(f"sequence {seq.seq_id}: block table does not cover its computed tokens")
        seq.arrival_index = self._next_arrival()
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        self._register_full_blocks(seq)

    def _next_arrival(self) -> int:
        self._arrivals += 1
        return self._arrivals

    # ------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []

        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self._grow(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_new))
                budget -= num_new
                index += 1

        # Admit only when nobody was preempted: otherwise we would hand the victim's blocks
        # to a newcomer and thrash.
        while not preempted and self.waiting and budget > 0 and self.can_add_running():
            seq = self.waiting[0]
            if not seq.block_table:
                match = self.allocator.match_prefix(seq.token_ids, max_tokens=seq.num_tokens - 1)
                seq.block_table = list(match.block_ids)
                seq.block_hashes = []
                seq.num_computed_tokens = match.num_tokens
                if seq.num_preemptions == 0:
                    seq.num_cached_prompt_tokens = match.num_tokens
                self._register_full_blocks(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._grow(seq, num_new):
                self._release(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_new))
            budget -= num_new

        return SchedulerOutput(tuple(chunks), tuple(preempted))

    def on_step_done(self, output: SchedulerOutput, sampled: Mapping[str, int]) -> None:
        """Advance each scheduled sequence past its chunk and append its sampled token.

        ``sampled`` maps seq_id to the token drawn for every chunk with ``samples`` true."""
        for chunk in output.chunks:
            seq = chunk.seq
            seq.num_computed_tokens = chunk.start + chunk.num_tokens
            if chunk.samples:
                seq.token_ids.append(sampled[seq.seq_id])
            self._register_full_blocks(seq)

    def finish(self, seq: Sequence, keep_blocks: bool = False) -> list[int]:
        """Remove a sequence. Its blocks are freed, or with ``keep_blocks`` handed to the caller
        (who then owns one reference to each and must free them: a prefill-side KV export)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        blocks = seq.block_table
        seq.block_table = []
        seq.block_hashes = []
        if not keep_blocks:
            self.allocator.free(blocks)
            return []
        return blocks

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ helpers
    def _grow(self, seq: Sequence, num_new: int) -> bool:
        """Give ``seq`` blocks for ``num_new`` more tokens; False (nothing taken) if short."""
        needed = self.allocator.blocks_for_tokens(seq.num_computed_tokens + num_new) - len(seq.block_table)
        if needed <= 0:
            return True
        if needed > self.allocator.num_available():
            return False
        seq.block_table.extend(self.allocator.allocate(needed))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Offer every newly full, fully computed block of ``seq`` to the prefix cache."""
        if not self.allocator.enable_prefix_caching:
            return  # nothing would be kept: skip hashing the blocks
        block_size = self.allocator.block_size
        num_full = min(seq.num_computed_tokens // block_size, len(seq.block_table))
        while len(seq.block_hashes) < num_full:
            index = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            block_hash = hash_block(parent, seq.token_ids[index * block_size : (index + 1) * block_size])
            self.allocator.register_full_block(seq.block_table[index], block_hash)
            seq.block_hashes.append(block_hash)
