"""Pick a transport by name. Pure Python: backends are imported only when asked for."""

from __future__ import annotations

from typing import Any

from hetpd.transfer.base import TransferReceiver, TransferSender

BACKENDS = ("inproc", "shm", "tcp", "nixl")


def _check(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown transfer backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def make_receiver(backend: str, **options: Any) -> TransferReceiver:
    """A receiver of ``backend``; ``options`` go to its constructor (e.g. ``host``, ``port``,
    ``key``: the deployment's shared secret, None only on a single trusted host; see ``base``)."""
    _check(backend)
    if backend == "inproc":
        from hetpd.transfer.inproc import InprocReceiver

        return InprocReceiver(**options)
    if backend == "shm":
        from hetpd.transfer.shm import ShmReceiver

        return ShmReceiver(**options)
    if backend == "tcp":
        from hetpd.transfer.tcp import TcpReceiver

        return TcpReceiver(**options)
    from hetpd.transfer.nixl import NixlReceiver

    return NixlReceiver(**options)


def make_sender(backend: str, **options: Any) -> TransferSender:
    """A sender of ``backend``; ``options`` go to its constructor (e.g. ``key``, the same secret
    as the receiver's); ``inproc`` needs ``receiver=`` (the InprocReceiver to feed)."""
    _check(backend)
    if backend == "inproc":
        from hetpd.transfer.inproc import InprocSender

        return InprocSender(**options)
    if backend == "shm":
        from hetpd.transfer.shm import ShmSender

        return ShmSender(**options)
    if backend == "tcp":
        from hetpd.transfer.tcp import TcpSender

        return TcpSender(**options)
    from hetpd.transfer.nixl import NixlSender

    return NixlSender(**options)
