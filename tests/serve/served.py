"""Start a real ``hetpd serve`` (router + worker processes) for a test, and stop it."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hetpd.serve.local import local_server


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
    """``hetpd serve`` on ``deploy`` until the block ends (RuntimeError, with the log, if it never comes up)."""
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump(deploy))
    log_path = tmp_path / "serve.log"
    with local_server(config, log_path, timeout, env) as server:
        yield Served(server.url, server.process, log_path, deploy.get("router", {}).get("api_key"))
    time.sleep(0.2)
