"""Run ``hetpd serve`` as a child process and wait for its URL: for benchmarks, tests and the
planner's fidelity check, which all need a real deployment on this machine."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LocalServer:
    url: str  # the OpenAI-compatible base URL (before /v1)
    process: subprocess.Popen[str]


@contextmanager
def local_server(config: Path, log_path: Path, timeout: float = 300.0,
                 env: dict[str, str] | None = None) -> Iterator[LocalServer]:
    """``hetpd serve --config config --port 0`` (stderr to ``log_path``) until it prints the URL it
    serves on; stopped with SIGINT (killed after 30 s) when the block ends. Raises RuntimeError,
    naming the log, when it exits or stays silent for ``timeout`` seconds."""
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "hetpd.cli", "serve", "--config", str(config), "--port", "0"],
                                   stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, **(env or {})})
        found: list[str] = []

        def read() -> None:  # keep draining stdout, or a chatty server would block on a full pipe
            assert process.stdout is not None
            for line in process.stdout:
                match = re.search(r"on (http://\S+)", line)
                if match and not found:
                    found.append(match.group(1))

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        try:
            while not found:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"hetpd serve did not come up:\n{log_path.read_text()[-4000:]}")
                time.sleep(0.1)
            yield LocalServer(found[0], process)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def worker_pids(server_pid: int) -> dict[str, int]:
    """Worker id -> pid of each worker process a ``hetpd serve`` (``server_pid``) runs now (from
    /proc; Linux): for tests and benchmarks that kill, freeze or measure one."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile, or not ours to read
        if parent == server_pid and b"--worker-id" in args[:-1]:
            found[args[args.index(b"--worker-id") + 1].decode()] = int(entry.name)
    return found
