"""The inference engine: one class, three roles.

* ``colocated``: prompt and generation in this engine.
* ``prefill``: runs the prompt, samples the first token, then holds the request's KV pages
  for :meth:`Engine.export_kv` until :meth:`Engine.release_kv` (ownership stays here until
  the consumer is done with them).
* ``decode``: :meth:`Engine.import_kv` reserves pages, writes (converting if the formats
  differ) and continues generation. A decode engine also accepts plain prompts, so it can
  recompute a request whose prefill side failed.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hetpd.core.block_allocator import BlockAllocator
from hetpd.core.scheduler import Scheduler, SchedulerConfig
from hetpd.core.sequence import Sequence
from hetpd.core.step_work import StepWork, step_work
from hetpd.engine.config import EngineConfig
from hetpd.engine.kv_cache import PagedKVCache
from hetpd.engine.runner import ModelRunner
from hetpd.engine.sampler import sample
from hetpd.kv.check import check
from hetpd.kv.codec import Encoded, codec_for
from hetpd.kv.convert import convert
from hetpd.kv.format import IncompatibleKVError, KVFormat, ModelFingerprint
from hetpd.kv.layout import pack, unpack
from hetpd.kv.state import Residency, RuntimeKVState
from hetpd.models.config import ModelConfig
from hetpd.models.loader import load_model
from hetpd.models.tokenizer import Tokenizer
from hetpd.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from hetpd.sampling_params import SamplingParams


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    params: SamplingParams
    seq: Sequence
    generator: torch.Generator | None
    arrival_time: float
    first_token_time: float | None = None
    logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str | None = None


@dataclass(frozen=True)
class StepResult:
    """What one :meth:`Engine.step` did.

    ``finished``: requests that ended this step. ``handed_off``: prefill-role requests whose
    first token was sampled and whose KV is now held for export. ``logits``: the float32 logits
    each sampled token was drawn from (rows of the step's logits tensor; for tests and tools).
    """

    finished: list[RequestOutput]
    handed_off: list[RequestOutput]
    sampled: dict[str, int]
    logits: dict[str, torch.Tensor]
    num_batched_tokens: int
    num_preempted: int
    work: StepWork = StepWork()  # what the step computed, as the planner's step models price it


@dataclass(frozen=True)
class Reservation:
    accepted: bool
    blocks: tuple[int, ...]
    reason: str = ""


@dataclass(frozen=True)
class ImportResult:
    accepted: bool
    reason: str = ""
    finished: RequestOutput | None = None  # set when the imported first token already ends it


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        runner: ModelRunner,
        scheduler: Scheduler,
        tokenizer: Tokenizer | None,
        max_model_len: int,
    ) -> None:
        self.config = config
        self.model_config = model_config
        self.runner = runner
        self.kv_cache = runner.kv_cache
        self.scheduler = scheduler
        self.allocator = scheduler.allocator
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.device = runner.device
        self._requests: dict[str, _Request] = {}
        self._held: dict[str, tuple[_Request, list[int]]] = {}  # prefill side: pages kept for a handoff
        self._reserved: dict[str, list[int]] = {}  # decode side: pages set aside for KV on its way
        self._generator = torch.Generator(device=self.device).manual_seed(config.seed)
        eos = set(model_config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        """Load the model and tokenizer and size the KV pool (this is where the I/O happens)."""
        model_dir = Path(config.model) if config.model is not None else _default_model_dir()
        model_config = ModelConfig.from_dir(model_dir)
        max_model_len = config.max_model_len or model_config.max_position_embeddings
        device = torch.device(config.device)
        model = load_model(
            model_dir, model_config, dtype=config.dtype, quantization=config.quantization, device=device,
            max_positions=max_model_len,
        )
        codec = codec_for(config.resolved_kv_cache_dtype)
        per_block = PagedKVCache.bytes_per_block(
            model_config.num_layers, config.block_size, model_config.num_kv_heads, model_config.head_dim, codec
        )
        num_blocks = config.num_kv_blocks or max(1, config.kv_cache_memory_bytes // per_block)
        kv_cache = PagedKVCache(
            num_layers=model_config.num_layers, num_blocks=num_blocks, block_size=config.block_size,
            num_kv_heads=model_config.num_kv_heads, head_dim=model_config.head_dim, codec=codec, device=device,
        )
        allocator = BlockAllocator(num_blocks, config.block_size, config.enable_prefix_caching)
        scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), allocator)
        tokenizer = Tokenizer.from_dir(model_dir) if (model_dir / "tokenizer.json").is_file() else None
        return cls(config, model_config, ModelRunner(model, kv_cache, device), scheduler, tokenizer, max_model_len)

    # ------------------------------------------------------------------ requests
    @property
    def kv_format(self) -> KVFormat:
        """What this engine's KV pages mean, as the boundary check sees them (all heads, no TP)."""
        codec = self.kv_cache.codec
        tokenizer_hash = self.tokenizer.content_hash if self.tokenizer is not None else None
        return KVFormat(
            model=ModelFingerprint.of(self.model_config, tokenizer_hash),
            dtype=codec.dtype,
            quant=codec.quant,
            page_size=self.kv_cache.block_size,
            head_start=0,
            head_end=self.model_config.num_kv_heads,
        )

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> None:
        """Queue a request; raises ValueError (naming the field) before touching any state.

        Atomic: everything that can fail (validation, the request and its seeded generator) is
        built before the scheduler sees the sequence. A sequence scheduled without its request
        would make the next :meth:`step` fail on every request in the batch."""
        if request_id in self._requests or request_id in self._held or request_id in self._reserved:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self._validate_tokens(prompt_token_ids, params)
        # A prefill engine only ever computes the prompt and samples one token; budgeting its
        # pool for the whole generation would refuse requests it can serve.
        horizon = 1 if self.config.role == "prefill" else params.max_tokens
        seq = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), horizon)
        request = self._new_request(request_id, prompt, params, seq)
        self.scheduler.add(seq)
        self._requests[request_id] = request

    def is_running(self, request_id: str) -> bool:
        """Queued or running here (not held for a handoff, not reserved, not finished)."""
        return request_id in self._requests

    def progress(self, request_id: str) -> tuple[tuple[int, ...], tuple[Logprob, ...]]:
        """Output token ids and logprobs of a running request so far (for streaming; no text)."""
        request = self._requests[request_id]
        return tuple(request.seq.output_token_ids), tuple(request.logprobs)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def abort(self, request_id: str) -> bool:
        """Drop a queued, running, held or reserved request and free its pages. False if unknown."""
        if request_id in self._held:
            self.release_kv(request_id)
            return True
        if self.cancel_reservation(request_id):
            return True
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        self.scheduler.finish(request.seq)
        return True

    # ------------------------------------------------------------------ one step
    def step(self) -> StepResult:
        output = self.scheduler.schedule()
        if output.is_empty:
            return StepResult([], [], {}, {}, 0, len(output.preempted))
        work = step_work(output)
        step_logits = self.runner.execute(output.chunks)
        requests = [self._requests[chunk.seq.seq_id] for chunk in step_logits.sampling_chunks]
        result = sample(step_logits.logits, [r.params for r in requests], [r.generator for r in requests])
        sampled = {r.request_id: token for r, token in zip(requests, result.token_ids)}
        self.scheduler.on_step_done(output, sampled)

        now = time.monotonic()
        finished: list[RequestOutput] = []
        handed_off: list[RequestOutput] = []
        for request, token, logprob in zip(requests, result.token_ids, result.logprobs):
            if request.first_token_time is None:
                request.first_token_time = now
            if logprob is not None:
                request.logprobs.append(Logprob(token, logprob.logprob, logprob.top))
            if self._check_finish(request, token):
                self.scheduler.finish(request.seq)
                del self._requests[request.request_id]
                finished.append(self._output(request))
            elif self.config.role == "prefill":
                blocks = self.scheduler.finish(request.seq, keep_blocks=True)
                del self._requests[request.request_id]
                self._held[request.request_id] = (request, blocks)
                handed_off.append(self._output(request))
        logits = {r.request_id: step_logits.logits[i] for i, r in enumerate(requests)}
        return StepResult(finished, handed_off, sampled, logits, output.num_batched_tokens, len(output.preempted), work)

    # ------------------------------------------------------------------ prefill side
    def held_request_ids(self) -> list[str]:
        return list(self._held)

    def held_blocks(self, request_id: str) -> tuple[int, ...]:
        """The pages a handed-off request holds (its KV, until release_kv)."""
        if request_id not in self._held:
            raise KeyError(f"request {request_id!r} holds no pages on this engine")
        return tuple(self._held[request_id][1])

    def export_kv(self, request_id: str, wire: KVFormat | None = None) -> RuntimeKVState:
        """Copy a held request's prompt KV out as bytes, in ``wire`` format (default: this engine's).

        Converting here is the producer side of a handoff plan (quantise before sending). The
        pages stay held until :meth:`release_kv`."""
        if request_id not in self._held:
            raise KeyError(f"request {request_id!r} holds no exportable KV on this engine")
        request, blocks = self._held[request_id]
        num_tokens = request.seq.num_prompt_tokens
        data, scales = self.kv_cache.read_tokens(self.kv_cache.slots_of(blocks, num_tokens))
        encoded, fmt = Encoded(data.cpu(), None if scales is None else scales.cpu(), None), self.kv_format
        if wire is not None and wire != fmt:
            encoded, fmt = convert(encoded, fmt, wire)
        return RuntimeKVState(
            request_id=request_id, format=fmt, token_start=0, token_end=num_tokens, layer_start=0,
            layer_end=fmt.model.num_layers, payload=pack(encoded, fmt), residency=Residency.HOST, location="host",
            owner=f"{self.config.role}:{request_id}", token_ids=tuple(request.seq.token_ids),
            first_token_logprob=request.logprobs[0].logprob if request.logprobs else None,
        )

    def release_kv(self, request_id: str) -> None:
        """Give a held request's pages back to the pool (after the consumer committed, or on abort)."""
        _, blocks = self._held.pop(request_id)
        self.allocator.free(blocks)

    # ------------------------------------------------------------------ decode side
    def import_kv(self, export: RuntimeKVState, params: SamplingParams, request_id: str | None = None) -> ImportResult:
        """Reserve pages for a request's KV, write it (converted to this engine's format) and
        continue generation: :meth:`reserve_kv` then :meth:`commit_kv` in one call. Refuses
        (nothing changed) when pages or sequence slots are short.

        Raises :class:`IncompatibleKVError` naming the fields when the representation check
        says the bytes cannot be used here, and ``ValueError`` for a malformed state."""
        request_id = request_id or export.request_id
        self._check_import(export, params, request_id)
        reservation = self.reserve_kv(request_id, export.num_tokens)
        if not reservation.accepted:
            return ImportResult(False, reservation.reason)
        return self._commit(export, params, request_id)

    def reserve_kv(self, request_id: str, num_tokens: int) -> Reservation:
        """Set pages and a sequence slot aside for a request whose KV is about to arrive.

        The pages belong to the reservation until :meth:`commit_kv` adopts them or
        :meth:`cancel_reservation` frees them; nothing else can take them meanwhile."""
        if request_id in self._requests or request_id in self._held or request_id in self._reserved:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if num_tokens < 1 or num_tokens >= self.max_model_len:
            raise ValueError(f"num_tokens {num_tokens} must be in [1, max_model_len {self.max_model_len})")
        if len(self.scheduler.running) + len(self._reserved) >= self.config.max_num_seqs:
            return Reservation(False, (), f"decode engine holds its maximum of {self.config.max_num_seqs} sequences")
        needed = self.allocator.blocks_for_tokens(num_tokens)
        if needed > self.allocator.num_available():
            return Reservation(False, (), f"needs {needed} KV pages, {self.allocator.num_available()} free")
        blocks = tuple(self.allocator.allocate(needed))
        self._reserved[request_id] = list(blocks)
        return Reservation(True, blocks)

    def cancel_reservation(self, request_id: str) -> bool:
        """Free a reservation's pages (the transfer failed or was aborted). False if unknown."""
        blocks = self._reserved.pop(request_id, None)
        if blocks is None:
            return False
        self.allocator.free(blocks)
        return True

    def reserved_request_ids(self) -> list[str]:
        return list(self._reserved)

    def commit_kv(self, export: RuntimeKVState, params: SamplingParams, request_id: str | None = None) -> ImportResult:
        """Write a reserved request's KV into its pages (converting) and start decoding it.

        On an error (incompatible or malformed KV) the reservation is left as it was, for the
        caller to cancel: pages change hands only through this call or cancel_reservation."""
        request_id = request_id or export.request_id
        if request_id not in self._reserved:
            raise ValueError(f"request {request_id!r} has no reservation; call reserve_kv first")
        self._check_import(export, params, request_id, reserved=True)
        return self._commit(export, params, request_id)

    def _commit(self, export: RuntimeKVState, params: SamplingParams, request_id: str) -> ImportResult:
        """:meth:`commit_kv` once the state was checked (import_kv checked it before reserving)."""
        blocks = self._reserved[request_id]
        if len(blocks) < self.allocator.blocks_for_tokens(export.num_tokens):
            raise ValueError(f"reservation of {len(blocks)} pages is too small for {export.num_tokens} tokens")
        seq = Sequence(request_id, list(export.token_ids), export.num_tokens, params.max_tokens)
        request = self._new_request(request_id, None, params, seq)  # before any state changes: it can raise
        mine = self.kv_format
        encoded, _ = convert(unpack(export.payload, export.format, export.num_tokens), export.format, mine)
        self.kv_cache.write_tokens(self.kv_cache.slots_of(blocks, export.num_tokens), encoded.codes, encoded.scales)
        del self._reserved[request_id]

        seq.num_computed_tokens = export.num_tokens
        seq.block_table = blocks
        self.scheduler.add_running(seq)
        request.first_token_time = request.arrival_time
        first_token = export.token_ids[-1]
        if params.logprobs is not None and export.first_token_logprob is not None:
            request.logprobs.append(Logprob(first_token, export.first_token_logprob))
        self._requests[request_id] = request
        if self._check_finish(request, first_token):
            self.scheduler.finish(seq)
            del self._requests[request_id]
            return ImportResult(True, finished=self._output(request))
        return ImportResult(True)

    def _check_import(self, export: RuntimeKVState, params: SamplingParams, request_id: str,
                      reserved: bool = False) -> None:
        """Everything that must hold before KV is written here; raises naming what does not."""
        problems = export.problems()
        if problems:
            raise ValueError("malformed KV state: " + "; ".join(problems))
        mine = self.kv_format
        verdict = check(export.format, mine)
        if not verdict.usable:
            raise IncompatibleKVError("KV from the producer cannot be used here: " + verdict.explain())
        if verdict.heads != (0, mine.model.num_kv_heads) or export.layer_start != 0 \
                or export.layer_end != mine.model.num_layers or export.token_start != 0:
            raise ValueError(f"this engine imports a whole request (all {mine.model.num_kv_heads} kv heads, all layers, "
                             f"tokens from 0); got heads {verdict.heads}, layers [{export.layer_start}, "
                             f"{export.layer_end}), tokens from {export.token_start}: merge shards or chunks first")
        if request_id in self._requests or request_id in self._held or (request_id in self._reserved and not reserved):
            raise ValueError(f"request_id {request_id!r} is already in use")
        self._validate_tokens(list(export.token_ids[:-1]), params)

    # ------------------------------------------------------------------ helpers
    def _new_request(self, request_id: str, prompt: str | None, params: SamplingParams, seq: Sequence) -> _Request:
        """The request's bookkeeping and generator; changes no engine state (callers rely on it to fail first)."""
        generator = None
        if not params.greedy:
            generator = self._generator
            if params.seed is not None:
                try:
                    generator = torch.Generator(device=self.device).manual_seed(params.seed)
                except (OverflowError, RuntimeError, TypeError, ValueError) as exc:
                    # SamplingParams keeps seeds in range; this guards a params object built around it.
                    raise ValueError(f"seed {params.seed!r} cannot seed a generator: {exc}") from exc
        return _Request(request_id, prompt, params, seq, generator, time.monotonic())

    def _validate_tokens(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("prompt is empty: give at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context "
                f"length {self.max_model_len}; shorten the prompt or lower max_tokens"
            )

    def _check_finish(self, request: _Request, token: int) -> bool:
        params, seq = request.params, request.seq
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            request.finish_reason, request.stop_reason = "stop", token
            return True
        if params.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_token_ids, params.skip_special_tokens)
            for stop in params.stop:
                index = text.find(stop)
                if index >= 0:
                    end = index + len(stop) if params.include_stop_str_in_output else index
                    request.text, request.finish_reason, request.stop_reason = text[:end], "stop", stop
                    return True
        if seq.num_output_tokens >= params.max_tokens:
            request.finish_reason = "length"
            return True
        return False

    def _output(self, request: _Request) -> RequestOutput:
        seq = request.seq
        token_ids = tuple(seq.output_token_ids)
        text = request.text
        if text is None and self.tokenizer is not None:
            # A stop token ends generation but is not part of the text.
            shown = token_ids[:-1] if isinstance(request.stop_reason, int) else token_ids
            text = self.tokenizer.decode(shown, request.params.skip_special_tokens)
        finished = request.finish_reason is not None
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=tuple(seq.prompt_token_ids),
            outputs=[
                CompletionOutput(
                    text=text or "",
                    token_ids=token_ids,
                    finish_reason=request.finish_reason,
                    stop_reason=request.stop_reason,
                    logprobs=tuple(request.logprobs) if request.params.logprobs is not None else None,
                )
            ],
            finished=finished,
            metrics=RequestMetrics(
                arrival_time=request.arrival_time,
                first_token_time=request.first_token_time,
                finished_time=time.monotonic() if finished else None,
                num_cached_tokens=seq.num_cached_prompt_tokens,
                num_preemptions=seq.num_preemptions,
            ),
        )


def _default_model_dir() -> Path:
    from hetpd.models.default_model import default_model_dir

    printed: list[str] = []

    def progress(message: str) -> None:
        # Conversion runs once per machine; show it, one overwritten line per tensor.
        printed.append(message)
        print(f"\rconverting the embedded SmolLM2-135M-Instruct GGUF (first use): {message[:60]:<60}",
              end="", file=sys.stderr, flush=True)

    folder = default_model_dir(progress=progress)
    if printed:
        print(file=sys.stderr)
    return folder
