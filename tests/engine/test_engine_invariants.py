"""Random interleavings of add / abort / step / handoff on a real (tiny) model: no page leaks,
no page owned twice, every request ends."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetpd.engine.config import EngineConfig
from hetpd.engine.engine import Engine
from hetpd.sampling_params import SamplingParams


def check_pages(engine: Engine) -> None:
    """Each in-use page's reference count equals its holders: running sequences plus held exports."""
    allocator = engine.allocator
    allocator.check_invariants()
    holders = Counter(b for s in engine.scheduler.running for b in s.block_table)
    for _, blocks in engine._held.values():  # noqa: SLF001 - the test audits ownership
        holders.update(blocks)
    for block in range(allocator.num_blocks):
        assert allocator.ref_count(block) == holders.get(block, 0), f"page {block}"


operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 12), st.integers(0, 3)),
        st.tuples(st.just("abort"), st.integers(0, 30), st.just(0), st.just(0)),
        st.tuples(st.just("step"), st.integers(1, 3), st.just(0), st.just(0)),
        st.tuples(st.just("handoff"), st.just(0), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations, prefill_role=st.booleans())
def test_random_operations_never_leak_pages(
    tiny_model_dir: Callable[[str], Path], ops: list[tuple[str, int, int, int]], prefill_role: bool
) -> None:
    role = "prefill" if prefill_role else "colocated"
    engine = Engine.from_config(EngineConfig(model=str(tiny_model_dir("llama")), role=role, block_size=4,
                                             num_kv_blocks=24, max_num_batched_tokens=16, max_num_seqs=4))
    decode = Engine.from_config(EngineConfig(model=str(tiny_model_dir("llama")), role="decode", block_size=8,
                                             num_kv_blocks=6, kv_cache_dtype="int8"))
    ids: list[str] = []
    for op, a, b, family in ops:
        if op == "add":
            request_id = f"r{len(ids)}"
            prompt = [3 + family] * min(a, 8) + list(range(10, 10 + max(0, a - 8)))  # shared prefixes
            try:
                engine.add_request(request_id, prompt, SamplingParams(max_tokens=b, temperature=0.0, ignore_eos=True))
                ids.append(request_id)
            except ValueError:
                pass  # larger than the whole pool: refused, nothing changed
        elif op == "abort" and ids:
            engine.abort(ids[a % len(ids)])  # queued, running, held or already gone
        elif op == "step":
            for _ in range(a):
                engine.step()
        elif op == "handoff":
            # The decode side may refuse (pool full): then the producer gives up the request.
            for request_id in engine.held_request_ids():
                result = decode.import_kv(engine.export_kv(request_id), SamplingParams(max_tokens=4, temperature=0.0))
                if result.accepted:
                    engine.release_kv(request_id)
                else:
                    engine.abort(request_id)
            decode.step()
        check_pages(engine)
        check_pages(decode)
    for engine_ in (engine, decode):
        steps = 0
        while engine_.has_unfinished():
            engine_.step()
            # Held pages only come back when a consumer is done with them: release as we go.
            for request_id in engine_.held_request_ids():
                engine_.release_kv(request_id)
            check_pages(engine_)
            steps += 1
            assert steps < 500, "requests never finished"
        for request_id in engine_.held_request_ids():
            engine_.release_kv(request_id)
        check_pages(engine_)
        assert engine_.allocator.stats().num_in_use == 0
