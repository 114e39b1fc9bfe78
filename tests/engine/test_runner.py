"""Attention grouping: sequences share a padded attention call only when that wastes little."""

from __future__ import annotations

from hetpd.engine.runner import _split_by_context, attention_groups


def test_similar_contexts_stay_in_one_group() -> None:
    assert _split_by_context([100, 110, 120, 128]) == [(0, 4)]
    assert _split_by_context([7]) == [(0, 1)]


def test_short_and_long_contexts_split_where_padding_is_saved() -> None:
    groups = _split_by_context([10, 12, 15, 20, 200, 210, 220, 230])
    assert groups == [(0, 4), (4, 8)]


def test_groups_cover_every_sequence_in_order() -> None:
    contexts = sorted([3, 90, 41, 17, 9, 64, 250, 251, 5, 128])
    groups = _split_by_context(contexts)
    assert groups[0][0] == 0 and groups[-1][1] == len(contexts)
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))


def test_a_prompt_chunk_does_not_pad_the_decodes_beside_it() -> None:
    # A 128-token chunk (context 128) beside 16 one-token decodes at context 321: by context alone
    # one group wastes little, but it would pad every decode to 128 queries.
    contexts, queries = [128] + [321] * 16, [128] + [1] * 16
    assert _split_by_context(contexts) == [(0, 17)]
    assert _split_by_context(contexts, queries) == [(0, 1), (1, 17)]


def test_decodes_and_prompt_chunks_never_share_a_call() -> None:
    # Ordered as the runner orders a step: 11 decodes (contexts 150-400), then a 215-token chunk.
    # By context alone the chunk sat between the decodes and padded to the longest decode's 400.
    decodes = [150 + 25 * i for i in range(11)]
    groups = attention_groups(decodes + [215], [1] * 11 + [215])
    assert groups[-1] == (11, 12)
    assert all(last <= 11 for _, last in groups[:-1])


def test_attention_groups_split_each_part_and_cover_the_batch() -> None:
    decodes = [10, 12, 15, 20, 200, 210, 220, 230]
    prompts = [64, 70, 480]  # two short chunks and a long one: the long one alone
    groups = attention_groups(decodes + prompts, [1] * 8 + [64, 70, 480])
    assert groups == [(0, 4), (4, 8), (8, 10), (10, 11)]
    assert attention_groups([100, 110], [1, 1]) == [(0, 2)]
    assert attention_groups([300], [300]) == [(0, 1)]
