"""The Runtime KV State: the one object that crosses the prefill/decode boundary. Pure Python.

A request's KV as bytes + the format descriptor that says what they mean + which tokens and
layers they cover + where they live + who owns them. Transports move ``payload``; the
representation check reads ``format``; the ownership layer tracks ``owner``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from hetpd.kv.format import KVFormat

Buffer = bytes | bytearray | memoryview


class Residency(Enum):
    DEVICE = "device"  # in an accelerator's memory (the engine's pool)
    HOST = "host"  # in this process's host memory (staged for a transport)
    REMOTE = "remote"  # in another process or host; ``location`` says where


@dataclass(frozen=True)
class RuntimeKVState:
    """KV of tokens ``[token_start, token_end)`` and layers ``[layer_start, layer_end)`` of one request.

    Invariants (see :meth:`problems`): ``payload`` is exactly ``format.payload_bytes`` for
    those tokens and layers, in the layer-major layout of :mod:`hetpd.kv.format`, so a layer
    range is a contiguous byte range; ``token_start`` is a multiple of the page size.
    ``token_ids`` holds the prompt and the first sampled token (``token_end + 1`` ids): the
    consumer continues from there.
    """

    request_id: str
    format: KVFormat
    token_start: int
    token_end: int
    layer_start: int
    layer_end: int
    payload: Buffer
    residency: Residency
    location: str
    owner: str
    token_ids: tuple[int, ...]
    first_token_logprob: float | None = None

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    @property
    def nbytes(self) -> int:
        return len(self.payload)

    def problems(self) -> list[str]:
        out = [f"format: {p}" for p in self.format.problems()]
        if not 0 <= self.token_start < self.token_end:
            out.append(f"token range [{self.token_start}, {self.token_end}) is empty or negative")
        if self.token_start % self.format.page_size:
            out.append(f"token_start {self.token_start} is not a multiple of page_size {self.format.page_size}")
        if not 0 <= self.layer_start < self.layer_end <= self.format.model.num_layers:
            out.append(f"layer range [{self.layer_start}, {self.layer_end}) outside the model's "
                       f"{self.format.model.num_layers} layers")
        if len(self.token_ids) != self.token_end + 1:
            out.append(f"{len(self.token_ids)} token ids, expected token_end + 1 = {self.token_end + 1}")
        if not out:
            expected = self.format.payload_bytes(self.num_tokens, self.num_layers)
            if len(self.payload) != expected:
                out.append(f"payload is {len(self.payload)} bytes, the format says {expected}")
        return out

    def layer_bytes(self) -> int:
        return self.format.layer_bytes(self.num_tokens)

    def layers(self, start: int, end: int) -> RuntimeKVState:
        """The same request's KV for layers ``[start, end)`` only (a streamed chunk; no copy)."""
        if not self.layer_start <= start < end <= self.layer_end:
            raise ValueError(f"layers [{start}, {end}) are not inside [{self.layer_start}, {self.layer_end})")
        size = self.layer_bytes()
        view = memoryview(self.payload)[(start - self.layer_start) * size:(end - self.layer_start) * size]
        return replace(self, layer_start=start, layer_end=end, payload=view)

    def moved(self, *, residency: Residency, location: str, owner: str, payload: Buffer | None = None) -> RuntimeKVState:
        """The state after the bytes changed place or hands (``payload`` when they were copied)."""
        return replace(self, residency=residency, location=location, owner=owner,
                       payload=self.payload if payload is None else payload)

    # ------------------------------------------------------------------ manifest (everything but the bytes)
    def manifest(self) -> str:
        """JSON of everything but the payload: what a consumer needs before the bytes arrive."""
        return json.dumps({
            "request_id": self.request_id, "format": json.loads(self.format.to_json()),
            "token_start": self.token_start, "token_end": self.token_end, "layer_start": self.layer_start,
            "layer_end": self.layer_end, "token_ids": list(self.token_ids),
            "first_token_logprob": self.first_token_logprob, "nbytes": len(self.payload),
        })

    @classmethod
    def from_manifest(cls, text: str, payload: Buffer, *, residency: Residency, location: str, owner: str) -> RuntimeKVState:
        """Rebuild a state from :meth:`manifest` and the bytes that arrived; ValueError names a bad field."""
        raw: dict[str, Any] = json.loads(text)
        try:
            state = cls(
                request_id=str(raw["request_id"]), format=KVFormat.from_json(json.dumps(raw["format"])),
                token_start=int(raw["token_start"]), token_end=int(raw["token_end"]),
                layer_start=int(raw["layer_start"]), layer_end=int(raw["layer_end"]), payload=payload,
                residency=residency, location=location, owner=owner,
                token_ids=tuple(int(t) for t in raw["token_ids"]),
                first_token_logprob=None if raw["first_token_logprob"] is None else float(raw["first_token_logprob"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"KV manifest lacks or mistypes a field: {exc}") from None
        return state


def manifest_nbytes(text: str) -> int:
    """Payload size a manifest announces (what the consumer stages for)."""
    value = json.loads(text).get("nbytes")
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"KV manifest 'nbytes' must be a positive integer, got {value!r}")
    return value
