"""The interface's value types and the factory."""

from __future__ import annotations

import json

import pytest

from hetpd.transfer import BACKENDS, RegionDescriptor, make_receiver, make_sender
from hetpd.transfer.base import writable_view


def test_region_descriptor_round_trips_through_json() -> None:
    d = RegionDescriptor("tcp", "kv", 123, {"host": "127.0.0.1", "port": 5000})
    assert RegionDescriptor.from_dict(json.loads(json.dumps(d.to_dict()))) == d


@pytest.mark.parametrize("raw, match", [
    ({"backend": "tcp", "region": "kv", "length": 1}, "exactly the keys"),
    ({"backend": "tcp", "region": "kv", "length": -1, "address": {}}, "'length' must be an int >= 0"),
    ({"backend": 1, "region": "kv", "length": 1, "address": {}}, "must be strings"),
    ({"backend": "tcp", "region": "kv", "length": 1, "address": {"a": [1]}}, "'address' must map"),
])
def test_region_descriptor_rejects_bad_dicts(raw: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RegionDescriptor.from_dict(raw)


def test_writable_view_flattens_and_refuses_read_only() -> None:
    import array

    assert len(writable_view(array.array("i", [1, 2]), "x")) == 8
    with pytest.raises(ValueError, match="must be writable"):
        writable_view(b"abc", "x")
    with pytest.raises(ValueError, match="buffer protocol"):
        writable_view("abc", "x")


def test_factory_knows_the_backends_and_lists_them_on_error() -> None:
    assert BACKENDS == ("inproc", "shm", "tcp", "nixl")
    with pytest.raises(ValueError, match="choose one of inproc, shm, tcp, nixl"):
        make_sender("rdma")
    with pytest.raises(ValueError, match="choose one of"):
        make_receiver("rdma")
    receiver = make_receiver("inproc")
    with make_sender("inproc", receiver=receiver) as sender, make_receiver("tcp") as tcp:
        assert sender.backend == "inproc" and tcp.backend == "tcp"
        sender.register_region("src", bytearray(4))
        dst = tcp.register_region("kv", bytearray(4))
        with pytest.raises(ValueError, match="use make_sender\\('tcp'"):
            sender.post("t", "src", dst, [], final=True)


def test_importing_the_nixl_adapter_imports_neither_nixl_nor_torch() -> None:
    import subprocess
    import sys

    code = "import sys, hetpd.transfer.nixl; print('nixl' in sys.modules, 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False False", done.stderr


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["inproc", "tcp", "shm"])
def test_without_checksums_bytes_still_land(backend: str) -> None:
    """verify=False (benchmarks only) on both sides skips hashing, not copying."""
    import os

    from hetpd.transfer import Span

    receiver = make_receiver(backend, verify=False)
    options = {"receiver": receiver} if backend == "inproc" else {}
    with receiver, make_sender(backend, verify=False, piece_bytes=1000, **options) as sender:
        region, source = bytearray(10_000), bytearray(os.urandom(10_000))
        dst = receiver.register_region("kv", region)
        sender.register_region("src", source)
        receiver.expect("n", "kv")
        sender.post("n", "src", dst, [Span(0, 5000, 5000), Span(7000, 0, 3000)], final=True)
        assert receiver.wait("n", 5).ok
        assert region[5000:] == source[:5000] and region[:3000] == source[7000:]
