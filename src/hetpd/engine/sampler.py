"""Token sampling from a batch of logits, each row with its own parameters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hetpd.sampling_params import SamplingParams

_TINY = torch.finfo(torch.float32).tiny  # 1 / tiny is still finite in float32


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's log-probability and the top alternatives (unmodified distribution)."""

    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> SampleResult:
    """Pick one token per row of ``logits`` ([N, vocab], float32).

    Greedy rows (temperature below ``GREEDY_BELOW``) take the argmax. Other rows apply
    temperature, top-k, then top-p, and draw with the row's own generator (seeded requests are
    reproducible whatever their batch).
    """
    tokens = logits.argmax(dim=-1)
    for row, (p, generator) in enumerate(zip(params, generators)):
        if p.greedy:  # also every temperature so small that logits / temperature would overflow
            continue
        scaled = _filter_top_k_top_p(logits[row] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(scaled, dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; one kernel, no sort.
        # E is kept above 0: a filtered token (p = 0) over E = 0 is NaN, and argmax takes NaN
        # as the largest value, so it would pick a token top-k/top-p had removed.
        noise = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(_TINY)
        tokens[row] = (probs / noise).argmax()
    token_list = tokens.tolist()
    logprobs: list[TokenLogprobs | None] = [None] * len(params)
    wanted = [row for row, p in enumerate(params) if p.logprobs is not None]
    if wanted:
        log_probs = torch.log_softmax(logits[wanted], dim=-1)
        for i, row in enumerate(wanted):
            count = params[row].logprobs or 0
            top_values, top_ids = log_probs[i].topk(count) if count else (log_probs[i][:0], log_probs[i][:0].long())
            logprobs[row] = TokenLogprobs(
                logprob=float(log_probs[i, token_list[row]]),
                top=tuple(zip(top_ids.tolist(), top_values.tolist())),
            )
    return SampleResult(token_list, logprobs)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token once the tokens before it already cover top_p; the first always stays.
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits
