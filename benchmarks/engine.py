#!/usr/bin/env python
"""Decode throughput of the hetpd engine against plain Hugging Face, and against the machine.

One run, one machine, one model, the same prompts for every system:

* hetpd ``Engine`` (continuous batching over a paged KV cache, greedy, ``ignore_eos``);
* HF ``generate()``: (a) one call per request, sequentially; (b) one left-padded batched call;
* a hand-written HF forward loop over a ``DynamicCache``: (a) per request; (b) left-padded batch
  with an attention mask and position ids.

Prefill and decode are timed separately and directly: hetpd per engine step (decode starts after
the step in which the last sequence sampled its first token), the HF loop around its prefill call,
and ``generate()`` with a logits processor that timestamps its first call (the prefill forward has
finished by then). ``--diff`` also runs every system with one new token and reports
``T(max_new_tokens) - T(1)`` as a cross-check.

The machine's limits are measured in the same run: copy bandwidth (``dst.copy_(src)``, 512 MiB fp32,
2 * bytes / time, best of several) and matmul throughput (2048^3 ``torch.mm`` in the run's dtype,
best of several; also the step's own [batch, hidden] x [hidden, intermediate] shape). The roofline
step time is max(bytes read per step / bandwidth, FLOPs per step / matmul throughput).

Run from the repository root:  .venv/bin/python benchmarks/engine.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from machine_load import cpu_pressure_us, loadavg

RESULTS_DIR = Path(__file__).resolve().parent / "results"

HETPD = "hetpd"
GEN_SEQ = "hf_generate_per_request"
GEN_BATCH = "hf_generate_batched"
LOOP_SEQ = "hf_loop_per_request"
LOOP_BATCH = "hf_loop_batched"
LABELS = {
    HETPD: "hetpd engine",
    GEN_SEQ: "HF generate, per request",
    GEN_BATCH: "HF generate, padded batch",
    LOOP_SEQ: "HF fwd loop, per request",
    LOOP_BATCH: "HF fwd loop, padded batch",
}

TARGET_VS_GENERATE = 10.0
TARGET_VS_LOOP = 3.0
TARGET_ROOFLINE = 1.5


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- inputs
def resolve_model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    for attempt in range(10):
        try:
            from hetpd.models.default_model import default_model_dir

            return Path(default_model_dir(progress=log))
        except ImportError as exc:  # another helper may still be writing the module
            log(f"hetpd.models.default_model not importable yet ({exc}); retry {attempt + 1}/10 in 30 s")
            time.sleep(30)
    raise SystemExit("no default model: pass --model DIR (e.g. a folder made by `hetpd import-gguf`)")


def make_prompts(model_dir: Path, count: int, min_len: int, max_len: int) -> list[list[int]]:
    """``count`` windows of real English text (the stdlib's pydoc topics), ``min_len``..``max_len``
    tokens long (evenly spaced), taken from different places in the text, tokenized by the model's
    tokenizer."""
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    text = "\n\n".join(topics[key] for key in sorted(topics))[:300_000]
    ids: list[int] = AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False)["input_ids"]
    if count == 1:
        lengths = [max_len]
    else:
        lengths = [round(min_len + (max_len - min_len) * i / (count - 1)) for i in range(count)]
    stride = (len(ids) - max_len) // count
    return [ids[i * stride : i * stride + n] for i, n in enumerate(lengths)]


# ---------------------------------------------------------------------------- one measurement
@dataclass
class Run:
    """One system generating for one set of prompts."""

    system: str
    batch: int
    max_new_tokens: int
    total_s: float
    prefill_s: float  # until every sequence has its first token
    decode_s: float  # the rest
    decode_tokens: int  # tokens generated after every sequence had its first token
    decode_steps: int  # forward passes in decode_s (per request summed for per-request systems)
    outputs: list[list[int]] = field(repr=False)
    step_s: list[float] = field(default_factory=list, repr=False)  # hetpd only: every engine step

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def decode_step_s(self) -> float:
        return self.decode_s / self.decode_steps if self.decode_steps else float("nan")

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("outputs")
        out["decode_tok_s"] = self.decode_tok_s
        out["decode_step_s"] = self.decode_step_s
        return out


class HetpdRunner:
    def __init__(self, model_dir: Path, dtype: str) -> None:
        from hetpd.engine.config import EngineConfig
        from hetpd.engine.engine import Engine
        from hetpd.sampling_params import SamplingParams

        self.SamplingParams = SamplingParams
        # Prefix caching off: every repeat sends the same prompts, and HF has no prefix cache.
        self.config = EngineConfig(
            model=str(model_dir), dtype=dtype, max_num_seqs=64, max_num_batched_tokens=2048,
            enable_prefix_caching=False,
        )
        self.engine = Engine.from_config(self.config)
        self._next_id = 0

    def add(self, prompts: Sequence[list[int]], max_new: int) -> list[str]:
        params = self.SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
        ids = []
        for prompt in prompts:
            request_id = f"r{self._next_id}"
            self._next_id += 1
            self.engine.add_request(request_id, list(prompt), params)
            ids.append(request_id)
        return ids

    def run(self, prompts: Sequence[list[int]], max_new: int) -> Run:
        engine = self.engine
        start = time.perf_counter()
        ids = self.add(prompts, max_new)
        produced = dict.fromkeys(ids, 0)
        outputs: dict[str, list[int]] = {}
        step_s: list[float] = []
        first_done_at: float | None = None  # when the last sequence got its first token
        decode_tokens = 0
        decode_steps = 0
        while engine.has_unfinished():
            t0 = time.perf_counter()
            result = engine.step()
            t1 = time.perf_counter()
            step_s.append(t1 - t0)
            if first_done_at is not None:
                decode_steps += 1
                decode_tokens += len(result.sampled)
            for request_id in result.sampled:
                produced[request_id] += 1
            for out in result.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
            if first_done_at is None and all(produced.values()):
                first_done_at = t1
        end = time.perf_counter()
        assert first_done_at is not None
        return Run(
            HETPD, len(prompts), max_new, end - start, first_done_at - start, end - first_done_at,
            decode_tokens, decode_steps, [outputs[i] for i in ids], step_s,
        )


class HFRunner:
    def __init__(self, model_dir: Path, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM, DynamicCache, LogitsProcessor, LogitsProcessorList
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        self.pad_id = self.model.config.pad_token_id
        if self.pad_id is None:
            self.pad_id = 0
        self.DynamicCache = DynamicCache
        # transformers 5.x renamed forward's `past_key_values` to `cache` (the old name warns).
        params = inspect.signature(self.model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

        class FirstCall(LogitsProcessor):
            """Timestamps generate()'s first logits processing: the prefill forward is done by then."""

            def __init__(self) -> None:
                self.first: float | None = None
                self.calls = 0

            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                if self.first is None:
                    self.first = time.perf_counter()
                self.calls += 1
                return scores

        self.FirstCall = FirstCall
        self.LogitsProcessorList = LogitsProcessorList

    def _pad(self, prompts: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        return ids, mask

    # -- generate()
    @torch.inference_mode()
    def _generate(self, prompts: Sequence[list[int]], max_new: int) -> tuple[float, float, float, list[list[int]]]:
        start = time.perf_counter()
        ids, mask = self._pad(prompts)
        timer = self.FirstCall()
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
            temperature=None, top_p=None, top_k=None, pad_token_id=self.pad_id,
            logits_processor=self.LogitsProcessorList([timer]),
        )
        end = time.perf_counter()
        assert timer.first is not None and timer.calls == max_new, (timer.calls, max_new)
        new = out[:, ids.shape[1] :].tolist()
        return end - start, timer.first - start, end - timer.first, new

    def generate(self, prompts: Sequence[list[int]], max_new: int, batched: bool) -> Run:
        return self._run_groups(GEN_BATCH if batched else GEN_SEQ, self._generate, prompts, max_new, batched)

    @staticmethod
    def _run_groups(system: str, run_one: Callable[[list[list[int]], int], tuple[float, float, float, list[list[int]]]],
                    prompts: Sequence[list[int]], max_new: int, batched: bool) -> Run:
        """All prompts as one padded batch, or one request after another; times summed."""
        groups = [list(prompts)] if batched else [[p] for p in prompts]
        total = prefill = decode = 0.0
        outputs: list[list[int]] = []
        for group in groups:
            t, p, d, new = run_one(group, max_new)
            total, prefill, decode = total + t, prefill + p, decode + d
            outputs.extend(new)
        steps = (max_new - 1) * len(groups)
        return Run(system, len(prompts), max_new, total, prefill, decode, len(prompts) * (max_new - 1), steps, outputs)

    # -- hand-written loop
    @torch.inference_mode()
    def _loop(self, prompts: Sequence[list[int]], max_new: int) -> tuple[float, float, float, list[list[int]]]:
        start = time.perf_counter()
        ids, mask = self._pad(prompts)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = self.DynamicCache(config=self.model.config)
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
            **{self.cache_kwarg: cache},
        ).logits
        token = logits[:, -1].argmax(-1)
        tokens = [token]
        first = time.perf_counter()
        position = positions[:, -1:]
        for _ in range(max_new - 1):
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
            position = position + 1
            logits = self.model(
                input_ids=token[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                logits_to_keep=1, **{self.cache_kwarg: cache},
            ).logits
            token = logits[:, -1].argmax(-1)
            tokens.append(token)
        end = time.perf_counter()
        return end - start, first - start, end - first, torch.stack(tokens, dim=1).tolist()

    def loop(self, prompts: Sequence[list[int]], max_new: int, batched: bool) -> Run:
        return self._run_groups(LOOP_BATCH if batched else LOOP_SEQ, self._loop, prompts, max_new, batched)


# ---------------------------------------------------------------------------- machine limits
def _best(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (first touch, oneDNN primitive creation)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class LoadProbe:
    """A fixed small workload (20 GEMVs over ~70 MB of distinct weights) timed before every
    measurement: when the shared machine is busy, this goes up, and the JSON shows it."""

    def __init__(self) -> None:
        self.weights = [torch.randn(576, 1536) for _ in range(20)]
        self.x = torch.randn(1, 576)

    def __call__(self) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for w in self.weights:
                torch.mm(self.x, w)
            best = min(best, time.perf_counter() - t0)
        return best




def measure_machine(dtype: torch.dtype, batches: Sequence[int], hidden: int, intermediate: int,
                    repeats: int) -> dict[str, Any]:
    """Copy bandwidth and matmul throughput, best of ``repeats``."""
    out: dict[str, Any] = {}
    n = 512 * 1024 * 1024 // 4
    src, dst = torch.randn(n), torch.empty(n)
    t = _best(lambda: dst.copy_(src), repeats)
    out["copy_bytes"] = 4 * n
    out["copy_s"] = t
    out["bandwidth_Bps"] = 2 * 4 * n / t
    del src, dst

    size = 2048
    for name, mm_dtype in (("fp32", torch.float32), ("run_dtype", dtype)):
        a, b = torch.randn(size, size).to(mm_dtype), torch.randn(size, size).to(mm_dtype)
        t = _best(lambda: torch.mm(a, b), repeats)
        out[f"mm{size}_{name}_flops"] = 2 * size**3 / t
    out["peak_flops"] = out[f"mm{size}_run_dtype_flops"]

    # The step's own shape, [batch, hidden] x [hidden, intermediate]. "hot": one weight, cache
    # resident; "cold": cycling through distinct weights totalling ~256 MiB (well past L3), as a
    # decode step does across its layers.
    weight_bytes = hidden * intermediate * torch.finfo(dtype).bits // 8
    num_weights = max(2, 256 * 1024 * 1024 // weight_bytes)
    weights = [torch.randn(hidden, intermediate).to(dtype) for _ in range(num_weights)]
    out["step_shape"] = {}
    for batch in batches:
        x = torch.randn(batch, hidden).to(dtype)
        flops = 2 * batch * hidden * intermediate * num_weights
        cold = _best(lambda: [torch.mm(x, w) for w in weights], repeats)
        hot = _best(lambda: [torch.mm(x, weights[0]) for _ in weights], repeats)
        out["step_shape"][str(batch)] = {
            "shape": f"[{batch},{hidden}]x[{hidden},{intermediate}]",
            "cold_flops": flops / cold, "hot_flops": flops / hot,
            "cold_Bps": num_weights * weight_bytes / cold,
        }
    return out


def merge_best(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Element-wise best (max throughput) of two measure_machine results."""
    out: dict[str, Any] = {}
    for key, value in a.items():
        if isinstance(value, dict):
            out[key] = merge_best(value, b[key])
        elif key.endswith(("flops", "Bps")):
            out[key] = max(value, b[key])
        elif key == "copy_s":
            out[key] = min(value, b[key])
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------- what a step must do
def model_costs(engine: Any) -> dict[str, Any]:
    """Parameter counts and bytes of the hetpd model, from its config and precision.

    Counted from shapes rather than from module attributes, since the loader swaps projections
    for prepacked (oneDNN) or int8 variants whose storage is not an ``nn.Linear`` weight."""
    model = engine.runner.model
    cfg = engine.model_config
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = cfg.hidden_size * (q_size + 2 * kv_size) + q_size * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size
    layer_params = cfg.num_layers * per_layer
    lm_head_params = cfg.vocab_size * cfg.hidden_size
    act_bytes = torch.finfo(model.embed_tokens.weight.dtype).bits // 8
    # int8 weight-only stores one byte per weight plus one bf16 scale per output row; the LM head stays in dtype.
    if engine.config.quantization == "int8":
        rows = cfg.num_layers * ((q_size + 2 * kv_size) + cfg.hidden_size + 2 * cfg.intermediate_size + cfg.hidden_size)
        layer_bytes = layer_params + 2 * rows
    else:
        layer_bytes = layer_params * act_bytes
    norm_bytes = sum(
        p.numel() * p.element_size() for name, p in model.named_parameters() if name.endswith("norm.weight")
    )
    kv_bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * engine.kv_cache.codec.element_bytes
    return {
        "matmul_params": layer_params + lm_head_params,  # lm_head counted once (one full matmul read per step)
        "matmul_weight_bytes": layer_bytes + lm_head_params * act_bytes,
        "norm_bytes": norm_bytes,
        "embedding_row_bytes": cfg.hidden_size * act_bytes,
        "kv_bytes_per_token": kv_bytes_per_token,
        "attn_flops_per_context_token": 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim,
        "lm_head_tied": cfg.tie_word_embeddings,
    }


def roofline(costs: dict[str, Any], machine: dict[str, Any], prompt_lens: Sequence[int], max_new: int,
             batch: int) -> dict[str, Any]:
    """Per decode step, averaged over the run's decode steps (context grows by one each step)."""
    steps = range(1, max_new)  # decode step k feeds token k of every sequence; context = len + k
    mean_context = statistics.fmean(sum(n + k for n in prompt_lens) for k in steps) if max_new > 1 else 0.0
    weight_bytes = costs["matmul_weight_bytes"] + costs["norm_bytes"] + batch * costs["embedding_row_bytes"]
    kv_bytes = mean_context * costs["kv_bytes_per_token"]
    flops = 2 * costs["matmul_params"] * batch + mean_context * costs["attn_flops_per_context_token"]
    memory_s = (weight_bytes + kv_bytes) / machine["bandwidth_Bps"]
    compute_s = flops / machine["peak_flops"]
    shape_flops = machine["step_shape"][str(batch)]["cold_flops"]
    return {
        "batch": batch,
        "weight_bytes": weight_bytes,
        "kv_bytes": kv_bytes,
        "sum_context_tokens": mean_context,
        "flops": flops,
        "memory_s": memory_s,
        "compute_s": compute_s,
        "roofline_s": max(memory_s, compute_s),
        "bound": "memory" if memory_s >= compute_s else "compute",
        # Not the roofline: the same FLOPs at the throughput torch.mm reaches on the step's own shape.
        "compute_at_step_shape_s": flops / shape_flops,
    }


@torch.inference_mode()
def matmul_floor(engine: Any, batch: int, repeats: int) -> float:
    """Seconds to run just the step's matmuls (every projection of every layer, and the LM head)
    on the model's real weights at ``batch`` rows: what the step costs with zero overhead."""
    model = engine.runner.model
    cfg = engine.model_config
    dtype = model.embed_tokens.weight.dtype
    h = torch.randn(batch, cfg.hidden_size, dtype=dtype)
    q = torch.randn(batch, cfg.num_heads * cfg.head_dim, dtype=dtype)
    i = torch.randn(batch, cfg.intermediate_size, dtype=dtype)

    def run() -> None:
        for layer in model.layers:
            layer.self_attn.qkv_proj(h)
            layer.self_attn.o_proj(q)
            layer.mlp.gate_up_proj(h)
            layer.mlp.down_proj(i)
        model.lm_head(h)

    return _best(run, repeats)


# ---------------------------------------------------------------------------- profile
def profile_hetpd(runner: HetpdRunner, prompts: Sequence[list[int]], steps: int) -> dict[str, Any]:
    """Where a hetpd decode step's time goes: coarse phases (timers wrapped around the engine's
    methods for this measurement only) and the top aten ops by self CPU time (torch.profiler)."""
    import hetpd.engine.engine as engine_module
    from torch.profiler import ProfilerActivity, profile

    engine = runner.engine
    phases: dict[str, float] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0

        return wrapper

    max_new = 2 * steps + 4
    runner.add(prompts, max_new)
    while True:  # prefill until every sequence has its first token
        engine.step()
        if all(seq.num_output_tokens >= 1 for seq in engine.scheduler.running) and not engine.scheduler.waiting:
            break
    for _ in range(2):
        engine.step()  # warm decode steps

    # Wrap the engine's phases in timers for this measurement only (instance attributes and the
    # engine module's `sample` name; all restored below). No source file is touched.
    model = engine.runner.model
    patches = [
        (engine.scheduler, "schedule", "scheduler.schedule"),
        (engine.runner, "_prepare", "runner._prepare (metadata tensors)"),
        (model, "forward", "model.forward (layers)"),
        (model, "compute_logits", "model.compute_logits (lm_head)"),
        (engine_module, "sample", "sample"),
    ]
    saved = [(obj, attr, obj.__dict__.get(attr)) for obj, attr, _ in patches]
    for obj, attr, label in patches:
        setattr(obj, attr, timed(label, getattr(obj, attr)))
    step_times = []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            step_times.append(time.perf_counter() - t0)
    finally:
        for obj, attr, original in saved:
            if original is None:
                delattr(obj, attr)  # was a class attribute: drop the instance override
            else:
                setattr(obj, attr, original)
    total = sum(step_times)
    phase_rows = {name: s / steps for name, s in phases.items()}
    phase_rows["rest of Engine.step"] = (total - sum(phases.values())) / steps

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            engine.step()
    while engine.has_unfinished():
        engine.step()
    averages = prof.key_averages()
    profiled_total = sum(e.self_cpu_time_total for e in averages)
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    by_shape = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: e.self_cpu_time_total,
                      reverse=True)[:12]
    return {
        "batch": len(prompts),
        "steps": steps,
        "step_s_mean": total / steps,
        "phases_s_per_step": phase_rows,
        "profiler_self_cpu_s_per_step": profiled_total / 1e6 / steps,
        "top_ops": [
            {"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "pct": 100 * e.self_cpu_time_total / profiled_total, "calls_per_step": e.count / steps}
            for e in top
        ],
        "top_ops_by_shape": [
            {"op": e.key, "shapes": str(e.input_shapes)[:160], "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "pct": 100 * e.self_cpu_time_total / profiled_total, "calls_per_step": e.count / steps}
            for e in by_shape
        ],
    }


# ---------------------------------------------------------------------------- report helpers
def median(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return float(statistics.median(values)) if values else float("nan")


def token_match(a: Sequence[list[int]], b: Sequence[list[int]]) -> dict[str, Any]:
    equal = sum(x == y for x, y in zip(a, b))
    prefixes = []
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        prefixes.append(n)
    return {"equal": equal, "total": len(a), "common_prefix_lens": prefixes}


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        pass
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "avx512": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "hetpd_commit": commit,
    }


def plot(path: Path, report: dict[str, Any]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    batches = report["config"]["batch_sizes"]
    systems = [HETPD, GEN_SEQ, GEN_BATCH, LOOP_SEQ, LOOP_BATCH]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / len(systems)
    for s_index, system in enumerate(systems):
        xs, ys = [], []
        for b_index, batch in enumerate(batches):
            value = report["summary"][str(batch)]["decode_tok_s"].get(system)
            if value is not None:
                xs.append(b_index + (s_index - (len(systems) - 1) / 2) * width)
                ys.append(value)
        bars = left.bar(xs, ys, width, label=LABELS[system])
        left.bar_label(bars, fmt="%.0f", fontsize=7)
    left.set_xticks(range(len(batches)), [f"{b} concurrent" for b in batches])
    left.set_ylabel("decode tokens/s (median of repeats)")
    left.set_title(f"Decode throughput, {report['config']['dtype']}, {report['config']['max_new_tokens']} new tokens")
    left.legend(fontsize=8)
    fractions = [report["summary"][str(b)]["step_over_roofline"] for b in batches]
    bars = right.bar([str(b) for b in batches], fractions, color="tab:gray")
    right.bar_label(bars, fmt="%.2fx", fontsize=8)
    right.axhline(TARGET_ROOFLINE, color="tab:red", linestyle="--", label=f"target {TARGET_ROOFLINE}x")
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_xlabel("concurrent sequences")
    right.set_ylabel("hetpd decode step / roofline")
    right.set_title("hetpd step time vs roofline")
    right.legend(fontsize=8)
    fig.suptitle(f"{report['machine']['cpu']}, {report['machine']['torch_threads']} threads, {report['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HF-format model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated concurrent-sequence counts")
    parser.add_argument("--min-prompt-len", type=int, default=20)
    parser.add_argument("--max-prompt-len", type=int, default=200)
    parser.add_argument("--diff", action="store_true",
                        help="also run every system with 1 new token and report (T(N) - T(1)) decode throughput")
    parser.add_argument("--max-cpu-pressure", type=float, default=0.10,
                        help="re-run a measurement when other processes kept a task waiting for a CPU during more "
                             "than this fraction of it (Linux /proc/pressure/cpu); same rule for every system")
    parser.add_argument("--retries", type=int, default=2, help="re-runs per contended measurement")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler pass over hetpd decode steps")
    parser.add_argument("--profile-steps", type=int, default=8)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4 concurrent, 8 new tokens, prompts 20-64, 1 repeat, no profile")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/engine-<date>[-<dtype>][-quick].json; "
                             "a PNG goes next to it)")
    args = parser.parse_args()
    if args.quick:
        args.max_new_tokens, args.repeats, args.batch_sizes = 8, 1, "1,4"
        args.min_prompt_len, args.max_prompt_len, args.no_profile = 20, 64, True
    batches = sorted({int(b) for b in args.batch_sizes.split(",")})
    if args.max_new_tokens < 2:
        parser.error("--max-new-tokens must be >= 2 (decode needs a token after the first)")
    dtype = getattr(torch, args.dtype)
    max_batch = max(batches)

    model_dir = resolve_model_dir(args.model)
    log(f"model {model_dir}, dtype {args.dtype}, threads {torch.get_num_threads()}")
    prompts = make_prompts(model_dir, max_batch, args.min_prompt_len, args.max_prompt_len)
    mid = prompts[len(prompts) // 2]
    prompt_sets = {b: (prompts if b == max_batch else _spread(prompts, b)) for b in batches}
    if 1 in prompt_sets:
        prompt_sets[1] = [mid]
    for b, ps in prompt_sets.items():
        log(f"batch {b}: prompt lengths {[len(p) for p in ps]}")

    log("loading hetpd engine")
    hetpd = HetpdRunner(model_dir, args.dtype)
    log("loading HF model")
    hf = HFRunner(model_dir, dtype)
    costs = model_costs(hetpd.engine)
    cfg = hetpd.engine.model_config

    log("measuring machine limits (copy bandwidth, matmul throughput)")
    machine_before = measure_machine(dtype, batches, cfg.hidden_size, cfg.intermediate_size, 7)
    log(f"  bandwidth {machine_before['bandwidth_Bps'] / 1e9:.1f} GB/s, "
        f"mm2048 {machine_before['peak_flops'] / 1e9:.1f} GFLOP/s ({args.dtype})")

    log("warm-up")
    warm = [p[:16] for p in prompts[:2]]
    hetpd.run(warm, 4)
    hf.generate(warm, 4, batched=True)
    hf.loop(warm, 4, batched=True)

    # One repeat, per batch size: hetpd, then each baseline followed by hetpd again, so every
    # baseline run sits between two hetpd runs and is compared with those neighbours only (the
    # machine's load drifts over seconds). Odd repeats run the list backwards.
    plan: list[tuple[int, str]] = []
    for b in batches:
        baselines = [GEN_SEQ, LOOP_SEQ] if b == 1 else [GEN_SEQ, GEN_BATCH, LOOP_SEQ, LOOP_BATCH]
        plan.append((b, HETPD))
        for baseline in baselines:
            plan += [(b, baseline), (b, HETPD)]
    new_token_counts = [args.max_new_tokens] + ([1] if args.diff else [])

    def measure(system: str, ps: list[list[int]], n: int) -> Run:
        gc.collect()
        if system == HETPD:
            return hetpd.run(ps, n)
        if system in (GEN_SEQ, GEN_BATCH):
            return hf.generate(ps, n, batched=system == GEN_BATCH)
        return hf.loop(ps, n, batched=system == LOOP_BATCH)

    probe = LoadProbe()
    runs: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []  # contended attempts that were re-run
    outputs: dict[str, dict[str, list[list[int]]]] = {str(b): {} for b in batches}
    for repeat in range(args.repeats):
        order = plan if repeat % 2 == 0 else plan[::-1]
        for position, (b, system) in enumerate(order):
            for n in new_token_counts:
                attempts: list[tuple[float, Run, dict[str, Any]]] = []
                for attempt in range(args.retries + 1):
                    probe_s, load, p0, t0 = probe(), loadavg(), cpu_pressure_us(), time.perf_counter()
                    run = measure(system, prompt_sets[b], n)
                    p1, t1 = cpu_pressure_us(), time.perf_counter()
                    pressure = (p1 - p0) / 1e6 / (t1 - t0) if p0 is not None and p1 is not None else float("nan")
                    rec = run.record() | {"repeat": repeat, "position": position, "attempt": attempt,
                                          "probe_s": probe_s, "loadavg": load, "cpu_pressure": pressure}
                    attempts.append((pressure, run, rec))
                    if not pressure > args.max_cpu_pressure:  # also stops when PSI is unavailable (nan)
                        break
                    log(f"  {LABELS[system]} batch {b}: other processes competed for the CPUs during "
                        f"{100 * pressure:.0f}% of the run ({run.decode_tok_s:.1f} decode tok/s); "
                        f"{'retrying' if attempt < args.retries else 'keeping the least contended attempt'}")
                pressure, run, rec = min(attempts, key=lambda a: a[0] if a[0] == a[0] else 0.0)
                for _, _, other in attempts:
                    if other is not rec:
                        discarded.append(other | {"kept": False})
                if system == HETPD:
                    decode_steps = run.step_s[len(run.step_s) - run.decode_steps :]
                    rec["decode_step_s_median"] = median(decode_steps) if decode_steps else float("nan")
                runs.append(rec)
                if n == args.max_new_tokens:
                    outputs[str(b)].setdefault(system, run.outputs)
                    if system == HETPD and outputs[str(b)][HETPD] != run.outputs:
                        log("  WARNING: hetpd produced different tokens in a repeat")
                log(f"repeat {repeat} batch {b:>2} {LABELS[system]:<26} new={n:<3} total {run.total_s:7.3f}s "
                    f"prefill {run.prefill_s:7.3f}s decode {run.decode_s:7.3f}s "
                    f"-> {run.decode_tok_s:8.1f} decode tok/s, {1e3 * run.decode_step_s:7.2f} ms/step "
                    f"[cpu pressure {100 * pressure:.0f}%]")

    log("measuring machine limits again")
    machine_after = measure_machine(dtype, batches, cfg.hidden_size, cfg.intermediate_size, 7)
    machine = merge_best(machine_before, machine_after)
    floors = {str(b): matmul_floor(hetpd.engine, b, 7) for b in batches}

    profiles = {}
    if not args.no_profile:
        for b in batches:
            log(f"profiling {args.profile_steps} hetpd decode steps at batch {b}")
            profiles[str(b)] = profile_hetpd(hetpd, prompt_sets[b], args.profile_steps)

    # ------------------------------------------------------------------ summary
    N = args.max_new_tokens

    def sel(b: int, system: str, repeat: int, n: int = N) -> list[dict[str, Any]]:
        return [r for r in runs if r["batch"] == b and r["system"] == system and r["repeat"] == repeat
                and r["max_new_tokens"] == n]

    def tok_s(b: int, system: str, repeat: int) -> float:
        """Per repeat: total decode tokens / total decode time over this system's runs."""
        rs = sel(b, system, repeat)
        return sum(r["decode_tokens"] for r in rs) / sum(r["decode_s"] for r in rs) if rs else float("nan")

    def paired_ratio(b: int, system: str, repeat: int) -> float:
        """hetpd decode tok/s from the two hetpd runs around this baseline run, over the baseline's."""
        (base,) = sel(b, system, repeat)
        near = [r for r in sel(b, HETPD, repeat) if abs(r["position"] - base["position"]) == 1]
        hetpd_tok_s = sum(r["decode_tokens"] for r in near) / sum(r["decode_s"] for r in near)
        return float(hetpd_tok_s / base["decode_tok_s"])

    def diff_tok_s(b: int, system: str, repeat: int) -> float:
        long, short = sel(b, system, repeat), sel(b, system, repeat, 1)
        if not long or not short:
            return float("nan")
        extra = statistics.fmean(r["total_s"] for r in long) - statistics.fmean(r["total_s"] for r in short)
        return long[0]["decode_tokens"] / extra if extra > 0 else float("nan")

    summary: dict[str, Any] = {}
    for b in batches:
        systems = [HETPD, GEN_SEQ, LOOP_SEQ] if b == 1 else [HETPD, GEN_SEQ, GEN_BATCH, LOOP_SEQ, LOOP_BATCH]
        per_repeat = {s: [tok_s(b, s, r) for r in range(args.repeats)] for s in systems}
        ratios = {s: [paired_ratio(b, s, r) for r in range(args.repeats)] for s in systems if s != HETPD}
        step_s = [statistics.fmean(x["decode_step_s"] for x in sel(b, HETPD, r)) for r in range(args.repeats)]
        best_step_s = min(x["decode_step_s_median"] for r in range(args.repeats) for x in sel(b, HETPD, r))
        prefill_s = {s: median([statistics.fmean(x["prefill_s"] for x in sel(b, s, r)) for r in range(args.repeats)])
                     for s in systems}
        roof = roofline(costs, machine, [len(p) for p in prompt_sets[b]], N, b)
        summary[str(b)] = {
            "prompt_lens": [len(p) for p in prompt_sets[b]],
            "decode_tok_s_per_repeat": per_repeat,
            "decode_tok_s": {s: median(v) for s, v in per_repeat.items()},
            "prefill_s": prefill_s,
            "ratio_per_repeat": ratios,
            "ratio_median": {s: median(v) for s, v in ratios.items()},
            "hetpd_step_s_per_repeat": step_s,
            "hetpd_step_s": median(step_s),
            "roofline": roof,
            "step_over_roofline": median(step_s) / roof["roofline_s"],
            # Least-disturbed hetpd run (median step of each run, min over runs), for comparison
            # with the limits, which are best-of too. Not what the verdict uses.
            "hetpd_best_step_s": best_step_s,
            "best_step_over_roofline": best_step_s / roof["roofline_s"],
            "matmul_floor_s": floors[str(b)],
            "token_match": {s: token_match(outputs[str(b)][HETPD], outputs[str(b)][s]) for s in systems if s != HETPD},
        }
        if args.diff:
            summary[str(b)]["diff_decode_tok_s"] = {
                s: median([diff_tok_s(b, s, r) for r in range(args.repeats)]) for s in systems
            }

    # ------------------------------------------------------------------ targets
    verdicts: list[dict[str, Any]] = []
    big = summary[str(max_batch)]
    for baseline, target in ((GEN_SEQ, TARGET_VS_GENERATE), (GEN_BATCH, TARGET_VS_GENERATE),
                             (LOOP_SEQ, TARGET_VS_LOOP), (LOOP_BATCH, TARGET_VS_LOOP)):
        if baseline in big["ratio_median"]:
            value = big["ratio_median"][baseline]
            verdicts.append({"target": f"hetpd decode tok/s >= {target:g}x {LABELS[baseline]} at {max_batch} concurrent",
                             "value": value, "threshold": target, "pass": value >= target})
    for b in batches:
        value = summary[str(b)]["step_over_roofline"]
        verdicts.append({"target": f"hetpd decode step <= {TARGET_ROOFLINE:g}x roofline at batch {b}",
                         "value": value, "threshold": TARGET_ROOFLINE, "pass": value <= TARGET_ROOFLINE})
        value = summary[str(b)]["best_step_over_roofline"]
        verdicts.append({"target": f"(secondary, least-disturbed run) hetpd decode step <= {TARGET_ROOFLINE:g}x "
                                   f"roofline at batch {b}",
                         "value": value, "threshold": TARGET_ROOFLINE, "pass": value <= TARGET_ROOFLINE})

    date = dt.datetime.now().strftime("%Y-%m-%d")
    report = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "config": {"model": str(model_dir), "dtype": args.dtype, "max_new_tokens": N, "repeats": args.repeats,
                   "batch_sizes": batches, "quick": args.quick, "diff": args.diff,
                   "max_cpu_pressure": args.max_cpu_pressure, "retries": args.retries,
                   "hetpd_engine_config": {k: v for k, v in asdict(hetpd.config).items()}},
        "machine": machine_info(),
        "machine_limits": {"before": machine_before, "after": machine_after, "best": machine},
        "model_costs": costs,
        "summary": summary,
        "verdicts": verdicts,
        "profiles": profiles,
        "runs": runs,
        "discarded_contended_runs": discarded,
        "outputs": outputs,
    }
    out_path = Path(args.out) if args.out else RESULTS_DIR / (
        f"engine-{date}{'' if args.dtype == 'float32' else '-' + args.dtype}{'-quick' if args.quick else ''}.json"
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1, default=str))
    png = out_path.with_suffix(".png")
    plotted = plot(png, report)

    print_report(report, args)
    print(f"\nJSON: {out_path}" + (f"\nPNG:  {png}" if plotted else "\nPNG:  skipped (matplotlib not installed)"))
    return 0


def _spread(prompts: list[list[int]], count: int) -> list[list[int]]:
    """``count`` prompts spread over the length range."""
    if count >= len(prompts):
        return prompts
    step = (len(prompts) - 1) / max(1, count - 1)
    return [prompts[round(i * step)] for i in range(count)]


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    m = report["machine"]
    limits = report["machine_limits"]["best"]
    costs = report["model_costs"]
    cfg = report["config"]
    print(f"\n== hetpd engine benchmark, {report['date']} ==")
    print(f"machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch threads {m['torch_threads']}, "
          f"torch {m['torch']}, transformers {m['transformers']}")
    print(f"model: {cfg['model']}  dtype {cfg['dtype']}, max_new_tokens {cfg['max_new_tokens']}, "
          f"repeats {cfg['repeats']}{', QUICK' if cfg['quick'] else ''}")
    print(f"measured limits (best of before/after): copy bandwidth {limits['bandwidth_Bps'] / 1e9:.1f} GB/s; "
          f"mm 2048^3 {limits['mm2048_fp32_flops'] / 1e9:.1f} GFLOP/s fp32, "
          f"{limits['mm2048_run_dtype_flops'] / 1e9:.1f} GFLOP/s {cfg['dtype']}")
    for b, s in limits["step_shape"].items():
        print(f"  step-shape mm {s['shape']}: {s['cold_flops'] / 1e9:.1f} GFLOP/s weights cold "
              f"({s['cold_Bps'] / 1e9:.1f} GB/s of weights), {s['hot_flops'] / 1e9:.1f} GFLOP/s hot")
    print(f"model: {costs['matmul_params'] / 1e6:.1f} M matmul params (lm_head once), "
          f"{costs['matmul_weight_bytes'] / 1e6:.0f} MB matmul weights, KV {costs['kv_bytes_per_token']} B/token")

    kept = [r["cpu_pressure"] for r in report["runs"] if r["cpu_pressure"] == r["cpu_pressure"]]
    if kept:
        print(f"contention: {len(report['discarded_contended_runs'])} contended attempts re-run; CPU pressure during "
              f"kept runs: median {100 * statistics.median(kept):.0f}%, max {100 * max(kept):.0f}% "
              f"(threshold {100 * cfg['max_cpu_pressure']:.0f}%)")
    header = f"{'batch':>5}  {'system':<26} {'decode tok/s':>12} {'prefill s':>9} {'hetpd/x':>8}  per-repeat ratios"
    print("\nDecode throughput (median over repeats; ratio = median of per-repeat hetpd/baseline)")
    print(header)
    print("-" * len(header))
    for b in cfg["batch_sizes"]:
        s = report["summary"][str(b)]
        for system, value in s["decode_tok_s"].items():
            ratio = s["ratio_median"].get(system)
            rr = s["ratio_per_repeat"].get(system, [])
            print(f"{b:>5}  {LABELS[system]:<26} {value:12.1f} {s['prefill_s'][system]:9.3f} "
                  f"{'' if ratio is None else f'{ratio:7.2f}x':>8}  {' '.join(f'{x:.2f}' for x in rr)}")
        if cfg["diff"]:
            diff = s["diff_decode_tok_s"]
            print(f"{'':>5}  T(N)-T(1) cross-check tok/s: " + ", ".join(f"{LABELS[k]} {v:.1f}" for k, v in diff.items()))

    print("\nhetpd decode step vs roofline (per step, averaged over the decode steps)")
    print("  step = median over repeats of the mean decode step; best = least-disturbed hetpd run (median step)")
    print("  mm floor = only the step's matmuls on the real weights, best of 7; cmp@shape = FLOPs at step-shape mm speed")
    header = (f"{'batch':>5} {'step ms':>8} {'roof ms':>8} {'step/roof':>9} {'best ms':>8} {'best/roof':>9} {'bound':>7} "
              f"{'mem ms':>7} {'cmp ms':>7} {'MB read':>8} {'GFLOP':>6} {'mm floor ms':>11} {'cmp@shape ms':>12}")
    print(header)
    print("-" * len(header))
    for b in cfg["batch_sizes"]:
        s = report["summary"][str(b)]
        r = s["roofline"]
        print(f"{b:>5} {1e3 * s['hetpd_step_s']:8.2f} {1e3 * r['roofline_s']:8.2f} {s['step_over_roofline']:8.2f}x "
              f"{1e3 * s['hetpd_best_step_s']:8.2f} {s['best_step_over_roofline']:8.2f}x {r['bound']:>7} {1e3 * r['memory_s']:7.2f} {1e3 * r['compute_s']:7.2f} "
              f"{(r['weight_bytes'] + r['kv_bytes']) / 1e6:8.1f} {r['flops'] / 1e9:6.2f} "
              f"{1e3 * s['matmul_floor_s']:11.2f} {1e3 * r['compute_at_step_shape_s']:12.2f}")

    print("\nGreedy tokens, hetpd vs each baseline (sequences equal / total; mean common prefix)")
    for b in cfg["batch_sizes"]:
        s = report["summary"][str(b)]
        parts = [f"{LABELS[k]} {v['equal']}/{v['total']} ({statistics.fmean(v['common_prefix_lens']):.1f} tok)"
                 for k, v in s["token_match"].items()]
        print(f"  batch {b}: " + "; ".join(parts))

    print("\nTargets" + (" (QUICK run: not the target configuration)" if cfg["quick"] else ""))
    for v in report["verdicts"]:
        print(f"  {'PASS' if v['pass'] else 'FAIL'}  {v['target']}: {v['value']:.2f}x (threshold {v['threshold']:g}x)")

    for b, p in report["profiles"].items():
        print(f"\nProfile: hetpd decode step at batch {b}, {p['steps']} steps, {1e3 * p['step_s_mean']:.2f} ms/step "
              f"(profiler self CPU total {1e3 * p['profiler_self_cpu_s_per_step']:.2f} ms/step)")
        for name, sec in p["phases_s_per_step"].items():
            print(f"    {name:<40} {1e3 * sec:8.2f} ms/step")
        print(f"    {'top ops by self CPU':<40} {'ms/step':>8} {'%':>6} {'calls/step':>10}")
        for row in p["top_ops"]:
            print(f"    {row['op']:<40} {row['self_cpu_ms_per_step']:8.2f} {row['pct']:6.1f} {row['calls_per_step']:10.0f}")
        print("    top (op, input shapes):")
        for row in p["top_ops_by_shape"][:8]:
            print(f"    {row['self_cpu_ms_per_step']:8.2f} ms {row['pct']:5.1f}% x{row['calls_per_step']:<4.0f} "
                  f"{row['op']} {row['shapes']}")


if __name__ == "__main__":
    sys.exit(main())
