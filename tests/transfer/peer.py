"""A transfer peer in its own process, driven by JSON lines on stdin (one reply line each).

    python peer.py receiver BACKEND SIZE     registers region "kv" of SIZE zero bytes
    python peer.py sender BACKEND SIZE SEED  registers source region "src": SIZE bytes from SEED

The first line printed is ``{"ready": true, "descriptor": ...}``. Commands: expect, wait, poll,
cancel, dump (region bytes to a file), post (sender), stream (sender: post forever until killed),
quit. Everything real: the backend's own sockets, shared memory and threads.

``HETPD_TEST_KEY`` (hex) in the environment: the key both ends are made with (none if unset).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from typing import Any

from hetpd.transfer import FaultInjection, RegionDescriptor, Span, TransferResult, make_receiver, make_sender


def result_dict(result: TransferResult) -> dict[str, Any]:
    return {"tid": result.transfer_id, "status": result.status.value, "nbytes": result.nbytes, "error": result.error}


def source_bytes(size: int, seed: int) -> bytearray:
    return bytearray(random.Random(seed).randbytes(size))


def main() -> None:
    role, backend, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # Replies own the real stdout; anything else printing to fd 1 (NIXL logs) goes to stderr.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    reply = lambda obj: print(json.dumps(obj), file=replies, flush=True)  # noqa: E731
    key = bytes.fromhex(os.environ["HETPD_TEST_KEY"]) if os.environ.get("HETPD_TEST_KEY") else None
    if role == "receiver":
        endpoint: Any = make_receiver(backend, key=key)
        region = bytearray(size)
        descriptor = endpoint.register_region("kv", region)
    else:
        fault = json.loads(sys.argv[5]) if len(sys.argv) > 5 else None
        endpoint = make_sender(backend, fault=FaultInjection(**fault) if fault else None, key=key)
        region = source_bytes(size, int(sys.argv[4]))
        descriptor = endpoint.register_region("src", region)
    reply({"ready": True, "descriptor": descriptor.to_dict()})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["cmd"]
        try:
            if op == "expect":
                endpoint.expect(cmd["tid"], "kv", cmd.get("nbytes"))
                reply({"ok": True})
            elif op == "wait":
                reply(result_dict(endpoint.wait(cmd["tid"], cmd["timeout"])))
            elif op == "cancel":
                reply(result_dict(endpoint.cancel(cmd["tid"])))
            elif op == "dump":
                with open(cmd["path"], "wb") as out:
                    out.write(region)
                reply({"ok": True})
            elif op in ("post", "stream"):
                dst = RegionDescriptor.from_dict(cmd["dst"])
                spans = [Span(*s) for s in cmd["spans"]]
                if op == "post":
                    endpoint.post(cmd["tid"], "src", dst, spans, final=cmd["final"])
                    reply({"ok": True})
                else:  # keep posting the same spans, never final, until killed
                    reply({"ok": True})
                    while True:
                        endpoint.post(cmd["tid"], "src", dst, spans, final=False)
                        time.sleep(0.01)
            elif op == "quit":
                endpoint.close()
                reply({"ok": True})
                return
            else:
                reply({"error": f"unknown command {op!r}"})
        except ValueError as exc:
            reply({"error": str(exc)})


if __name__ == "__main__":
    main()
