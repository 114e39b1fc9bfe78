"""Sampler: greedy, seeded temperature sampling, top-k, top-p, logprobs."""

from __future__ import annotations

import torch

from hetpd.engine.sampler import sample
from hetpd.sampling_params import SamplingParams


def logits_rows(n: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def draws(logits: torch.Tensor, params: SamplingParams, count: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [sample(logits, [params], [generator]).token_ids[0] for _ in range(count)]


def test_greedy_is_argmax() -> None:
    logits = logits_rows(4)
    result = sample(logits, [SamplingParams(temperature=0.0)] * 4, [None] * 4)
    assert result.token_ids == logits.argmax(-1).tolist()


def test_same_seed_same_tokens_regardless_of_batch() -> None:
    logits = logits_rows(3)
    params = SamplingParams(temperature=1.0)
    alone = sample(logits[1:2], [params], [torch.Generator().manual_seed(7)]).token_ids[0]
    batched = sample(
        logits, [params] * 3, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(7), None]
    ).token_ids[1]
    assert alone == batched


def test_temperature_sampling_follows_the_distribution() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    counts = torch.bincount(torch.tensor(draws(logits, SamplingParams(temperature=1.0), 3000)), minlength=3)
    expected = torch.softmax(logits[0], -1) * 3000
    assert torch.all((counts.float() - expected).abs() < 5 * expected.sqrt() + 5)


def test_top_k_keeps_only_the_k_best() -> None:
    logits = logits_rows(1)
    best = set(logits[0].topk(3).indices.tolist())
    assert set(draws(logits, SamplingParams(temperature=2.0, top_k=3), 300)) <= best


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = set(draws(logits, SamplingParams(temperature=1.0, top_p=0.7), 500))
    assert seen == {0, 1}  # 0.5 + 0.3 covers 0.7; token 2 would exceed the nucleus


def test_logprobs_are_from_the_unmodified_distribution() -> None:
    logits = logits_rows(2)
    params = SamplingParams(temperature=0.0, logprobs=2)
    result = sample(logits, [params, SamplingParams(temperature=0.0)], [None, None])
    reference = torch.log_softmax(logits[0], -1)
    chosen = result.logprobs[0]
    assert chosen is not None and result.logprobs[1] is None
    assert abs(chosen.logprob - reference.max().item()) < 1e-5
    assert [t for t, _ in chosen.top] == reference.topk(2).indices.tolist()
