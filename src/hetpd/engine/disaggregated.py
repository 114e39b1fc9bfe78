"""Prefill and decode engines in one process, handing KV across as bytes.

The serving layer does the same across processes; this in-process pair is what tests and
``hetpd generate --disaggregated`` use to show the boundary works: a prefill engine runs the
prompt in its precision, exports bytes plus their format, and a decode engine with another
precision imports them (converting) and continues.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from hetpd.engine.engine import Engine
from hetpd.kv.plan import HandoffPlan, plan_handoff
from hetpd.kv.state import RuntimeKVState
from hetpd.outputs import RequestOutput
from hetpd.sampling_params import SamplingParams


@dataclass(frozen=True)
class HandoffStats:
    num_handoffs: int
    bytes_moved: int
    producer_kv_dtype: str
    consumer_kv_dtype: str
    plan: HandoffPlan

    @property
    def converted(self) -> bool:
        """Element values were re-encoded on the way (not just moved or re-paged)."""
        return any(step in self.plan.verdict.steps for step in ("cast", "quantise", "dequantise"))


@dataclass(frozen=True)
class DisaggregatedResult:
    outputs: list[RequestOutput]
    handoffs: HandoffStats


class DisaggregatedPair:
    def __init__(self, prefill: Engine, decode: Engine) -> None:
        if prefill.config.role != "prefill" or decode.config.role != "decode":
            raise ValueError("DisaggregatedPair needs a prefill-role and a decode-role engine")
        self.prefill = prefill
        self.decode = decode
        # Checked once, up front: an incompatible pair is refused before any request runs.
        self.plan = plan_handoff(prefill.kv_format, decode.kv_format)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams], prompt_texts: Sequence[str | None] | None = None
    ) -> DisaggregatedResult:
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        texts = list(prompt_texts) if prompt_texts is not None else [None] * len(prompts)
        ids = [f"pd-{i}" for i in range(len(prompts))]
        by_id = dict(zip(ids, params_list))
        for request_id, tokens, p, text in zip(ids, prompts, params_list, texts):
            self.prefill.add_request(request_id, list(tokens), p, prompt=text)

        prompt_of = dict(zip(ids, texts))
        outputs: dict[str, RequestOutput] = {}
        first_token_time: dict[str, float | None] = {}
        pending: deque[RuntimeKVState] = deque()
        handoffs, bytes_moved = 0, 0
        while self.prefill.has_unfinished() or pending or self.decode.has_unfinished():
            if self.prefill.has_unfinished():
                step = self.prefill.step()
                for out in step.finished:  # ended at the first token (EOS, stop, max_tokens=1)
                    outputs[out.request_id] = out
                for out in step.handed_off:
                    first_token_time[out.request_id] = out.metrics.first_token_time
                    pending.append(self.prefill.export_kv(out.request_id, self.plan.wire))
            # Import in arrival order; a refused import waits (backpressure) and keeps its pages held.
            while pending:
                export = pending[0]
                result = self.decode.import_kv(export, by_id[export.request_id])
                if not result.accepted:
                    break
                pending.popleft()
                self.prefill.release_kv(export.request_id)  # consumer committed: producer lets go
                handoffs += 1
                bytes_moved += export.nbytes
                if result.finished is not None:
                    outputs[export.request_id] = result.finished
            if self.decode.has_unfinished():
                for out in self.decode.step().finished:
                    outputs[out.request_id] = out
            elif pending:
                # An idle decode engine has its whole pool free: refusing now means refusing forever.
                raise RuntimeError("decode engine cannot fit a handed-off request even when idle: raise its KV pool")

        merged = []
        for request_id in ids:
            out = outputs[request_id]
            metrics = out.metrics
            if request_id in first_token_time:
                metrics = dataclasses.replace(metrics, first_token_time=first_token_time[request_id])
            merged.append(dataclasses.replace(out, prompt=prompt_of[request_id], metrics=metrics))
        stats = HandoffStats(handoffs, bytes_moved, self.prefill.kv_cache.codec.name, self.decode.kv_cache.codec.name, self.plan)
        return DisaggregatedResult(merged, stats)
