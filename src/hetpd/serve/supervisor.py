"""Keeps the worker processes ``hetpd serve`` started alive: reaps, restarts, kills the frozen.

One slot per worker id. A worker that exits is reaped at once (no zombie) and, once the
deployment was up, restarted with the same command after a back-off that doubles per restart
within ``restart_window_s``, up to ``max_restarts``; it registers again under a new epoch. A
worker the router has not heard from for ``kill_after_s`` (frozen: a stopped process, a
deadlock) is killed, then restarted the same way. Exit status 2 (bad command line) and 3 (the
router refused it: an incompatible worker) are final: restarting cannot help.

The supervisor only knows processes and worker ids; the router says how long a worker has been
silent. Workers started by hand (``hetpd worker``) are not supervised here.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

from hetpd.serve.deploy import SuperviseConfig

# A worker exiting with these will exit the same way again.
FINAL_EXIT_CODES = {2: "bad command line", 3: "refused by the router"}


@dataclass
class _Slot:
    worker_id: str
    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)  # when each restart happened (monotonic)
    next_start: float | None = None  # a restart is due at this time
    gave_up: str | None = None  # why this slot stays empty


@dataclass(frozen=True)
class SlotStatus:
    worker_id: str
    pid: int | None
    restarts: int
    gave_up: str | None


class Supervisor:
    """Starts, reaps, restarts and kills local worker processes (call :meth:`poll` often)."""

    def __init__(self, config: SuperviseConfig, env: dict[str, str], log: Callable[[str], None]) -> None:
        self.config = config
        self.env = env
        self.log = log
        self.restarting = False  # off until the deployment first came up: a start-up failure is the user's to fix
        self._slots: dict[str, _Slot] = {}

    def start(self, worker_id: str, command: list[str]) -> None:
        slot = _Slot(worker_id, command)
        self._slots[worker_id] = slot
        self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        slot.process = subprocess.Popen(slot.command, env=self.env)
        slot.next_start = None

    def exited(self) -> list[str]:
        """Worker ids whose process has exited and is not running again (yet)."""
        return [s.worker_id for s in self._slots.values() if s.process is None or s.process.poll() is not None]

    def status(self) -> list[SlotStatus]:
        return [SlotStatus(s.worker_id, s.process.pid if s.process is not None and s.process.poll() is None else None,
                           len(s.restarts), s.gave_up) for s in self._slots.values()]

    def poll(self, now: float, silent_for: Callable[[str], float | None]) -> None:
        """Reap exited workers, schedule and run due restarts, kill workers silent too long.
        ``silent_for(worker_id)``: seconds since the router heard from it (None: not registered)."""
        for slot in self._slots.values():
            process = slot.process
            if process is not None:
                code = process.poll()  # reaps it: no zombie is left behind
                if code is None:
                    silent = silent_for(slot.worker_id)
                    if silent is not None and silent > self.config.kill_after_s:
                        self.log(f"supervisor: {slot.worker_id} (pid {process.pid}) silent for {silent:.0f}s; killing it")
                        process.kill()
                    continue
                slot.process = None
                self._schedule(slot, code, now)
            if slot.next_start is not None and now >= slot.next_start:
                slot.restarts.append(now)
                self.log(f"supervisor: restarting {slot.worker_id} (restart {len(slot.restarts)})")
                self._spawn(slot)

    def _schedule(self, slot: _Slot, code: int, now: float) -> None:
        how = f"exited with status {code}" if code >= 0 else f"was killed by signal {-code}"
        if code in FINAL_EXIT_CODES:
            slot.gave_up = f"{how} ({FINAL_EXIT_CODES[code]})"
        elif not (self.restarting and self.config.restart):
            slot.gave_up = how
        else:
            window = self.config.restart_window_s
            slot.restarts = [t for t in slot.restarts if now - t < window]
            if len(slot.restarts) >= self.config.max_restarts:
                slot.gave_up = f"{how}; {len(slot.restarts)} restarts in {window:.0f}s already"
            else:
                slot.next_start = now + self.config.restart_backoff_s * 2 ** len(slot.restarts)
                self.log(f"supervisor: {slot.worker_id} {how}; restarting in {slot.next_start - now:.1f}s")
                return
        self.log(f"supervisor: {slot.worker_id} {slot.gave_up}; not restarting it")

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate every worker (killed if it does not exit within ``timeout``) and reap it."""
        running = [s.process for s in self._slots.values() if s.process is not None and s.process.poll() is None]
        for process in running:
            process.terminate()
        for process in running:
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for slot in self._slots.values():
            slot.next_start = None
