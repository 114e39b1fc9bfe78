"""The pure-Python layers import without torch, so the planner's simulator can reuse them."""

from __future__ import annotations

import subprocess
import sys

PURE_MODULES = [
    "hetpd.core.scheduler", "hetpd.core.step_work", "hetpd.core.block_allocator", "hetpd.core.sequence",
    "hetpd.models.config", "hetpd.sampling_params", "hetpd.outputs",
    "hetpd.kv", "hetpd.kv.format", "hetpd.kv.check", "hetpd.kv.plan", "hetpd.kv.state", "hetpd.kv.table",
    "hetpd.transfer.base", "hetpd.transfer.factory", "hetpd.transfer.tcp", "hetpd.transfer.shm",
    "hetpd.transfer.inproc", "hetpd.transfer.nixl",
    "hetpd.ownership.lease", "hetpd.ownership.ledger", "hetpd.ownership.recovery", "hetpd.ownership.messages",
    "hetpd.bench.traces", "hetpd.bench.workload", "hetpd.bench.prompts", "hetpd.bench.metrics",
    "hetpd.serve.deploy", "hetpd.serve.openai_protocol",
    "hetpd.plan.spec", "hetpd.plan.cost", "hetpd.plan.simulator", "hetpd.plan.search", "hetpd.plan.scenario",
    "hetpd.plan.explain", "hetpd.plan.emit", "hetpd.plan.profile",
]


def test_pure_layers_do_not_import_torch() -> None:
    code = "import sys\n" + "".join(f"import {m}\n" for m in PURE_MODULES) + "print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
