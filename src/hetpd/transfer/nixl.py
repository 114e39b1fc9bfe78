"""NVIDIA NIXL transport (UCX underneath): pull, like ``shm``, but across hosts and devices.

Found on this project's machines (CPU only): ``nixl==1.5.1`` (a meta package over
``nixl-cu12``) installs from the PyPI mirror, imports without a GPU, and moves DRAM bytes
between two agents with its UCX backend, in one process and across processes. It is not a
dependency of hetpd (install it yourself); importing this module never imports nixl, and
nixl itself imports torch (its CUDA detection), so nixl is only imported when a
:class:`NixlSender` or :class:`NixlReceiver` is made; without it they raise ``RuntimeError``.

How it fits the interface: NIXL is one-sided (the *initiator* writes or reads remote memory),
so to keep the receiver's guarantee (its own process performs every write into its memory)
the receiver is the initiator and issues READs: the sender registers its source memory with
its agent and sends, with each post, its agent metadata (NIXL's own serialisation, carried
as base64 in our JSON control messages; never pickle) and the source's address. The receiver
reads each piece into its region, waits for the READ to complete, then hashes what landed.
The pull protocol, checksums (MACs, with a key), the handshake, cancellation and peer loss
are those of ``pull``.

Limits: DRAM only (VRAM would need the device pointer and a CUDA build of the receiver's
buffer); one READ per piece, waited for before the next (simple, not the fastest); a READ
that outlives ``io_timeout`` is released (NIXL aborts it) and the transfer fails.
"""

from __future__ import annotations

import base64
import ctypes
import importlib
import os
import secrets
import time
from typing import Any

from hetpd.transfer.auth import HANDSHAKE_TIMEOUT_S
from hetpd.transfer.base import Buffer, FaultInjection, RegionDescriptor, Span, writable_view
from hetpd.transfer.checksum import PIECE_BYTES, Hasher, hash_landed
from hetpd.transfer.net import MAX_CONNS, MAX_CONNS_PER_PEER, Conn
from hetpd.transfer.pull import PullReceiver, PullSender

BACKEND = "nixl"


def _nixl_api() -> Any:
    try:
        return importlib.import_module("nixl._api")
    except Exception as exc:  # ImportError, or the meta package failing to find a backend
        raise RuntimeError(f"the nixl backend needs the 'nixl' package (pip install nixl==1.5.1), "
                           f"which does not import here: {exc}") from exc


def _agent(role: str) -> Any:
    api = _nixl_api()
    name = f"hetpd-{role}-{os.getpid()}-{secrets.token_hex(4)}"
    return api.nixl_agent(name, api.nixl_agent_config(backends=["UCX"]))


def _address_of(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class NixlReceiver(PullReceiver):
    """Pulls posted pieces with NIXL READs into regions registered with its own agent."""

    backend = BACKEND

    def __init__(self, host: str = "127.0.0.1", port: int = 0, io_timeout: float = 10.0, verify: bool = True, *,
                 key: bytes | None = None, handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
                 max_conns_per_peer: int = MAX_CONNS_PER_PEER, max_conns: int = MAX_CONNS) -> None:
        self._agent = _agent("recv")
        self._remotes: dict[int, dict[str, str]] = {}  # id(conn) -> remote agent -> its metadata
        self._registered: dict[str, Any] = {}
        super().__init__(host, port, io_timeout, verify, key=key, handshake_timeout=handshake_timeout,
                         max_conns_per_peer=max_conns_per_peer, max_conns=max_conns)
        self._io_timeout = io_timeout

    def register_region(self, name: str, buffer: Buffer) -> RegionDescriptor:
        descriptor = super().register_region(name, buffer)
        view = writable_view(buffer, f"region {name!r}")
        self._registered[name] = self._agent.register_memory([(_address_of(view), len(view), 0, "")], "DRAM")
        return descriptor

    def unregister_region(self, name: str) -> None:
        super().unregister_region(name)
        self._agent.deregister_memory(self._registered.pop(name))

    def _fetch(self, conn: Conn, source: dict[str, Any], piece: Span, dst: memoryview, hasher: Hasher | None) -> bytes:
        agent, metadata, addr, length = (source.get(k) for k in ("agent", "metadata", "addr", "length"))
        if not (isinstance(agent, str) and isinstance(metadata, str) and isinstance(addr, int)
                and isinstance(length, int)):
            raise ValueError(f"source {str(source)[:200]} is not a NIXL source")
        if piece.src_offset < 0 or piece.src_offset + piece.length > length:
            raise ValueError(f"span src_offset={piece.src_offset} length={piece.length} outside the "
                             f"sender's {length}-byte region")
        known = self._remotes.setdefault(id(conn), {})
        if known.get(agent) != metadata:  # new agent, or it registered more memory since
            if agent in known:
                self._agent.remove_remote_agent(agent)
            self._agent.add_remote_agent(base64.b64decode(metadata))
            known[agent] = metadata
        local = self._agent.get_xfer_descs([(_address_of(dst), piece.length, 0)], "DRAM")
        remote = self._agent.get_xfer_descs([(addr + piece.src_offset, piece.length, 0)], "DRAM")
        handle = self._agent.initialize_xfer("READ", local, remote, agent)
        try:
            state = self._agent.transfer(handle)
            deadline = time.monotonic() + self._io_timeout
            while state == "PROC" and time.monotonic() < deadline:
                state = self._agent.check_xfer_state(handle)
            if state != "DONE":
                raise ValueError(f"NIXL READ of span src_offset={piece.src_offset} length={piece.length} "
                                 f"ended {state!r}" + (" (timed out)" if state == "PROC" else ""))
        finally:
            handle.release()  # aborts a READ still in progress
        return hash_landed(dst, hasher)

    def _forget_peer(self, conn: Conn) -> None:
        for agent in self._remotes.pop(id(conn), {}):
            try:
                self._agent.remove_remote_agent(agent)
            except Exception:  # the agent may already be gone; nothing to release then
                pass

    def close(self) -> None:
        super().close()
        for handle in self._registered.values():
            self._agent.deregister_memory(handle)
        self._registered.clear()


class NixlSender(PullSender):
    """Registers source regions with its own NIXL agent; the receiver READs them."""

    backend = BACKEND

    def __init__(self, fault: FaultInjection | None = None, piece_bytes: int = PIECE_BYTES,
                 connect_timeout: float = 5.0, io_timeout: float = 10.0, verify: bool = True, *,
                 key: bytes | None = None, handshake_timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
        self._agent = _agent("send")
        super().__init__(fault, piece_bytes, connect_timeout, io_timeout, verify, key=key,
                         handshake_timeout=handshake_timeout)
        self._registered: dict[str, Any] = {}
        self._metadata = ""

    def register_region(self, name: str, buffer: Buffer) -> RegionDescriptor:
        descriptor = super().register_region(name, buffer)
        view = self._sources[name]
        self._registered[name] = self._agent.register_memory([(_address_of(view), len(view), 0, "")], "DRAM")
        # Registration changes the agent's metadata: refresh what posts carry.
        self._metadata = base64.b64encode(self._agent.get_agent_metadata()).decode()
        return descriptor

    def _release_source(self, name: str) -> None:
        self._tell_receivers_forget(name)
        self._agent.deregister_memory(self._registered.pop(name))
        self._metadata = base64.b64encode(self._agent.get_agent_metadata()).decode()

    def _source(self, src_region: str) -> dict[str, Any]:
        view = self._sources[src_region]
        return {"agent": self._agent.name, "metadata": self._metadata, "addr": _address_of(view),
                "length": len(view)}

    def close(self) -> None:
        super().close()
        for handle in self._registered.values():
            self._agent.deregister_memory(handle)
        self._registered.clear()
