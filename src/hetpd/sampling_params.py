"""Per-request sampling parameters, with vLLM's names and defaults. Pure Python."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

# Seeds are OpenAI's (and vLLM's) int64 range. torch.Generator.manual_seed takes [-2**63, 2**64 - 1]
# and maps a negative seed s to 2**64 + s, so every seed in this range seeds its own generator and
# none collide; a seed outside it makes manual_seed raise "Overflow when unpacking long long".
SEED_MIN = -(2**63)
SEED_MAX = 2**63 - 1

# A temperature below this is greedy, as in vLLM (_SAMPLING_EPS): logits divided by 1e-40 overflow
# float32 to inf, softmax turns inf into NaN, and the "sample" is whatever argmax makes of NaNs.
GREEDY_BELOW = 1e-5

MAX_TEMPERATURE = 100.0
MAX_LOGPROBS = 20


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to us


def _is_real(value: object) -> bool:
    """A finite int or float (NaN fails every range check silently; inf would reach the sampler)."""
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _token_ids(raw: tuple[Any, ...]) -> tuple[int, ...]:
    """Ints and int-likes (numpy ints, tensor items) as ints; never bools, floats or strings."""
    try:
        if not any(isinstance(t, bool) for t in raw):
            return tuple(operator.index(t) for t in raw)
    except TypeError:
        pass
    raise ValueError(f"stop_token_ids must be integers, got {raw!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    ``temperature`` below ``GREEDY_BELOW`` (0 included) is greedy. ``top_k <= 0`` and
    ``top_p == 1`` disable those filters. ``seed`` is in the int64 range. ``logprobs`` (if set)
    asks for the chosen token's log-probability plus that many top alternatives, from the
    unmodified distribution. Stop strings are cut from the text unless
    ``include_stop_str_in_output``.

    Every field is checked here, so a request the engine accepts cannot fail later in sampling:
    a ValueError names the field.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        # Accept lists and a lone string for stop fields (the OpenAI API allows both).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", _token_ids(tuple(self.stop_token_ids)))
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_real(self.temperature) or not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k):
            raise ValueError(f"top_k must be an integer (-1 or 0 disables it), got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX):
            raise ValueError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}] (int64), got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer between 0 and {MAX_LOGPROBS}, got {self.logprobs!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW
