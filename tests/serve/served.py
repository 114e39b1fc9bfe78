"""Start a real ``hetpd serve`` (router + worker processes) for a test, and stop it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass
class Served:
    url: str
    process: subprocess.Popen[str]
    log_path: Path
    api_key: str | None = None

    def get(self, path: str) -> Any:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        request = urllib.request.Request(self.url + path, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
            return json.loads(body) if response.headers.get_content_type() == "application/json" else body.decode()

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_idle(self, timeout: float = 20.0) -> dict[str, Any]:
        """Until every worker reports no pages in use, no live lease, nothing held or reserved."""
        deadline = time.monotonic() + timeout
        while True:
            workers: dict[str, Any] = self.get("/v1/admin/workers")
            busy = {k: w for k, w in workers.items()
                    if w.get("pages_in_use") or w.get("live_leases") or w.get("held") or w.get("reserved")}
            if not busy:
                return workers
            if time.monotonic() > deadline:
                raise AssertionError(f"workers still hold KV: {busy}")
            time.sleep(0.2)


@contextmanager
def serve(deploy: dict[str, Any], tmp_path: Path, timeout: float = 240.0,
          env: dict[str, str] | None = None) -> Iterator[Served]:
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump(deploy))
    log_path = tmp_path / "serve.log"
    log = log_path.open("w")
    process = subprocess.Popen([sys.executable, "-m", "hetpd.cli", "serve", "--config", str(config), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, **(env or {})})
    found: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            match = re.search(r"on (http://\S+)", line)
            if match and not found:
                found.append(match.group(1))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"hetpd serve did not come up:\n{log_path.read_text()}")
        time.sleep(0.1)
    try:
        yield Served(found[0], process, log_path, deploy.get("router", {}).get("api_key"))
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
