"""TCP transport: plus TCP-only checks."""

from __future__ import annotations

import socket

import pytest
from transfer import harness

from hetpd.transfer import Span, TransferStatus
from hetpd.transfer.tcp import TcpReceiver, TcpSender

@pytest.mark.timeout(30)
def test_bad_input_raises_and_changes_nothing() -> None:
    with TcpReceiver() as receiver, TcpSender() as sender:
        harness.out_of_bounds_raises(sender, receiver)


@pytest.mark.timeout(30)
def test_garbage_on_the_socket_fails_the_bound_transfer_not_the_receiver() -> None:
    with TcpReceiver() as receiver, TcpSender() as sender:
        dst = receiver.register_region("kv", bytearray(100))
        receiver.expect("g", "kv")
        sender.register_region("src", bytearray(100))
        sender.post("g", "src", dst, [Span(0, 0, 10)], final=False)
        with socket.create_connection((str(dst.address["host"]), int(dst.address["port"]))) as rogue:
            rogue.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(64))
        sender.post("g", "src", dst, [Span(10, 10, 10)], final=True)
        assert receiver.wait("g", 5).status is TransferStatus.OK


@pytest.mark.timeout(30)
def test_connect_refused_is_a_failed_result_not_an_exception() -> None:
    with TcpReceiver() as receiver:
        dst = receiver.register_region("kv", bytearray(100))
    with TcpSender(connect_timeout=1.0) as sender:
        sender.register_region("src", bytearray(100))
        sender.post("x", "src", dst, [Span(0, 0, 10)], final=True)
        got = sender.wait("x", 5)
        assert got.status is TransferStatus.FAILED and "cannot connect" in (got.error or "")
