"""``hetpd serve``: the router and its HTTP API in this process, the workers as child processes.

With no ``--config`` it runs the embedded default (one prefill and one decode worker of
SmolLM2-135M-Instruct, precision chosen per role). ``--sample-request TEXT`` sends one chat
request through the running deployment over real HTTP, prints the answer and the request's
lifecycle trace, and shuts everything down: the README's main command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from hetpd.models.tokenizer import Tokenizer
from hetpd.serve.api import build_app
from hetpd.serve.credentials import (
    API_KEY_ENV,
    SECRET_ENV,
    CredentialError,
    new_secret,
    resolve,
    write_secret_file,
)
from hetpd.serve.deploy import DeploymentConfig
from hetpd.serve.http_guard import server_config
from hetpd.serve.router import Router
from hetpd.serve.supervisor import Supervisor

READY_TIMEOUT_S = 600.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_model(deploy: DeploymentConfig) -> Path:
    if deploy.model is not None:
        return Path(deploy.model)
    from hetpd.models.default_model import default_model_dir

    return default_model_dir(progress=log)


def worker_threads(num_workers: int, cpus: int | None = None) -> int:
    """Torch threads per local worker: the host's cores less one for the router (API, tokenizer,
    streaming), shared among the workers, at least one each. A multi-threaded engine whose cores
    the router also needs stalls at every parallel region's barrier (measured here: a colocated
    worker on both of 2 cores ran decode steps 2-10x slower whenever the router or the load
    generator was busy), so the router's core is left free, as vLLM's CPU backend advises."""
    cpus = cpus if cpus is not None else os.cpu_count() or 1
    return max(1, (cpus - 1) // num_workers)


def worker_commands(deploy: DeploymentConfig, model_dir: Path, control: str) -> dict[str, list[str]]:
    """The command line of each local worker, by worker id (no secret on it: that is in the env)."""
    commands: dict[str, list[str]] = {}
    for pool in deploy.pools:
        for index in range(pool.count):
            worker_id = f"{pool.name}-{index}"
            commands[worker_id] = [
                sys.executable, "-m", "hetpd.serve.worker", "--router", control, "--worker-id", worker_id,
                "--pool", pool.model_dump_json(), "--handoff", deploy.handoff.model_dump_json(),
                "--supervise", deploy.supervise.model_dump_json(), "--model", str(model_dir)]
    return commands


def worker_env(deploy: DeploymentConfig, secret: str) -> dict[str, str]:
    workers = sum(pool.count for pool in deploy.pools)
    # Share this host's cores among its workers unless the user pinned a number.
    threads = os.environ.get("HETPD_TORCH_THREADS") or str(worker_threads(workers))
    return {**os.environ, SECRET_ENV: secret, "HETPD_TORCH_THREADS": threads}


def deployment_secret(deploy: DeploymentConfig) -> tuple[str, Path | None]:
    """The shared secret (file, environment or generated) and, if generated, the 0600 file it
    was written to so that a worker started by hand can join."""
    secret = resolve(deploy.router.secret, deploy.router.secret_file, SECRET_ENV, "router.secret")
    if secret:
        return secret, None
    secret = new_secret()
    return secret, write_secret_file(secret, f"secret-{os.getpid()}")


async def serve(deploy: DeploymentConfig, sample_request: str | None = None, port: int | None = None) -> int:
    try:
        secret, secret_path = deployment_secret(deploy)
        api_key = resolve(deploy.router.api_key, deploy.router.api_key_file, API_KEY_ENV, "router.api_key")
    except CredentialError as exc:
        log(f"hetpd: {exc}")
        return 2
    model_dir = resolve_model(deploy)
    tokenizer = Tokenizer.from_dir(model_dir)
    router = Router(deploy, secret, log)
    supervisor = Supervisor(deploy.supervise, worker_env(deploy, secret), log)

    async def supervise() -> None:
        while True:
            supervisor.poll(time.monotonic(), router.silent_for)
            await asyncio.sleep(0.2)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        control_port = await router.start(deploy.router.host, deploy.router.control_port)
        control = f"{deploy.router.host}:{control_port}"
        log(f"hetpd: router control on {control}; starting {sum(p.count for p in deploy.pools)} worker(s)")
        if secret_path is not None:
            log(f"hetpd: shared secret in {secret_path} (join a worker: hetpd worker --router {control} "
                f"--secret-file {secret_path} ...)")
        for worker_id, command in worker_commands(deploy, model_dir, control).items():
            supervisor.start(worker_id, command)
        watching = asyncio.get_running_loop().create_task(supervise())
        yield
        watching.cancel()
        await router.stop()

    app = build_app(router, tokenizer, deploy.model_name, api_key)
    app.router.lifespan_context = lifespan
    http_port = deploy.router.port if port is None else port
    server = uvicorn.Server(server_config(app, deploy.router, http_port))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if serving.done():
                return 1
            await asyncio.sleep(0.05)
        bound = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://{deploy.router.host}:{bound}"
        started = time.monotonic()
        while not router.ready():
            dead = supervisor.exited()
            if dead or time.monotonic() - started > READY_TIMEOUT_S:
                log(f"hetpd: workers failed to start ({len(dead)} exited); see their messages above")
                return 1
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)  # let every pool's workers finish joining
        supervisor.restarting = True
        print(f"hetpd serving {deploy.model_name} on {url} (workers: "
              f"{', '.join(f'{w.worker_id}={w.role}' for w in router.workers.values())})", flush=True)
        if sample_request is not None:
            return await asyncio.to_thread(run_sample, url, deploy.model_name, sample_request, api_key)
        await serving
        return 0
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, timeout=10)
        supervisor.stop()
        if secret_path is not None:
            secret_path.unlink(missing_ok=True)


def _post(url: str, body: dict[str, Any], api_key: str | None) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=300) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def run_sample(url: str, model: str, text: str, api_key: str | None) -> int:
    started = time.monotonic()
    reply = _post(f"{url}/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": text}],
                                                   "max_tokens": 48, "temperature": 0}, api_key)
    elapsed = time.monotonic() - started
    print(f"\n--- request ---\n{text}\n--- answer ({reply['usage']['completion_tokens']} tokens, "
          f"{elapsed:.2f}s, finish_reason={reply['choices'][0]['finish_reason']}) ---")
    print(reply["choices"][0]["message"]["content"])
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}  # the trace is under /v1: it needs the key too
    with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/requests/{reply['id']}/trace", headers=auth),
                                timeout=30) as response:
        trace = json.loads(response.read())
    steps = trace["steps"]
    origin = steps.get("queued", 0.0)
    print("--- lifecycle (ms since arrival) ---")
    print("  " + ", ".join(f"{name} {1000 * (at - origin):.0f}" for name, at in steps.items()))
    print(f"  workers: {trace['workers']}")
    return 0
