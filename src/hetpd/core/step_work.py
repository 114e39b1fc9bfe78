"""The work one engine step does, in the four numbers that price it.

The scheduler's output decides it; the engine reports it with every step, ``hetpd serve
--step-trace`` records it beside the step's measured time, and the planner's step models
(:mod:`hetpd.plan.step_model`) price it. Pure Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetpd.core.scheduler import SchedulerOutput

# Set to a directory, it makes every served worker append its engine steps there, one JSON line
# a step in <worker id>.jsonl: {"at", "wall", "cpu", "work", and "before"/"after": the seconds the
# worker's loop spent on control around the step}; `hetpd serve --step-trace` sets it.
STEP_TRACE_ENV = "HETPD_STEP_TRACE"


@dataclass(frozen=True)
class StepWork:
    """The work of one step. ``prefill_pairs`` counts (query, key) pairs of the prompt chunks:
    a chunk of ``n`` tokens starting at ``start`` has ``n * start + n * (n + 1) // 2``."""

    prefill_tokens: int = 0
    prefill_pairs: int = 0
    decode_seqs: int = 0
    decode_context: int = 0

    @staticmethod
    def chunk_pairs(start: int, num_tokens: int) -> int:
        return num_tokens * start + num_tokens * (num_tokens + 1) // 2


def step_work(output: SchedulerOutput) -> StepWork:
    """The work a scheduled step does: prompt chunks (prefill, or recompute after preemption) and
    one-token decodes past the prompt."""
    prefill_tokens = prefill_pairs = decode_seqs = decode_context = 0
    for chunk in output.chunks:
        if chunk.num_tokens == 1 and chunk.start >= chunk.seq.num_prompt_tokens:
            decode_seqs += 1
            decode_context += chunk.start + 1
        else:
            prefill_tokens += chunk.num_tokens
            prefill_pairs += StepWork.chunk_pairs(chunk.start, chunk.num_tokens)
    return StepWork(prefill_tokens, prefill_pairs, decode_seqs, decode_context)
