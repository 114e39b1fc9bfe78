"""The supervisor on real child processes: reaped at once, restarted with back-off, given up on
after too many restarts or a final exit status, killed when the router stops hearing them."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hetpd.serve.deploy import SuperviseConfig
from hetpd.serve.supervisor import Supervisor

FAST = SuperviseConfig(heartbeat_s=0.1, unresponsive_s=0.5, kill_after_s=1.0, max_restarts=2, restart_window_s=60,
                       restart_backoff_s=0.2)


def run_until(supervisor: Supervisor, done: object, timeout: float = 20.0,
              silent: dict[str, float] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, supervisor.status()
        supervisor.poll(time.monotonic(), lambda worker_id: (silent or {}).get(worker_id))
        time.sleep(0.05)


def is_zombie(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" in status.read_text()


def test_an_exited_worker_is_reaped_restarted_with_back_off_and_given_up_on(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    log: list[str] = []
    supervisor = Supervisor(FAST, {}, log.append)
    supervisor.restarting = True
    # Each start appends a line, then the process dies.
    supervisor.start("w", [sys.executable, "-c", f"open({str(starts)!r}, 'a').write('x\\n'); raise SystemExit(1)"])
    first_pid = supervisor.status()[0].pid
    started = time.monotonic()
    run_until(supervisor, lambda: supervisor.status()[0].gave_up is not None)
    assert starts.read_text().count("x") == 3  # the start and max_restarts=2 restarts
    assert time.monotonic() - started >= 0.2 + 0.4  # back-off 0.2 s, then doubled
    assert first_pid is not None and not is_zombie(first_pid)
    assert "2 restarts" in supervisor.status()[0].gave_up  # type: ignore[operator]
    assert any("restarting in 0.4s" in line for line in log)


def test_final_exit_codes_and_start_up_failures_are_not_restarted() -> None:
    supervisor = Supervisor(FAST, {}, lambda m: None)
    supervisor.start("before-up", [sys.executable, "-c", "raise SystemExit(1)"])
    run_until(supervisor, lambda: supervisor.status()[0].gave_up is not None)  # restarting is still off
    supervisor.restarting = True
    supervisor.start("refused", [sys.executable, "-c", "raise SystemExit(3)"])
    run_until(supervisor, lambda: all(s.gave_up for s in supervisor.status()))
    reasons = {s.worker_id: s.gave_up for s in supervisor.status()}
    assert "refused by the router" in str(reasons["refused"])
    assert "status 1" in str(reasons["before-up"])
    assert all(s.restarts == 0 for s in supervisor.status())


def test_silence_below_kill_after_leaves_the_worker_alone_and_above_kills_it() -> None:
    supervisor = Supervisor(FAST, {}, lambda m: None)
    supervisor.restarting = True
    supervisor.start("frozen", [sys.executable, "-c", "import time; time.sleep(60)"])
    pid = supervisor.status()[0].pid
    for _ in range(10):
        supervisor.poll(time.monotonic(), lambda worker_id: 0.9)
        time.sleep(0.02)
    assert supervisor.status()[0].pid == pid and supervisor.status()[0].restarts == 0
    run_until(supervisor, lambda: supervisor.status()[0].restarts == 1, silent={"frozen": 5.0})
    assert pid is not None and not is_zombie(pid)  # killed and reaped
    assert supervisor.status()[0].pid not in (None, pid)
    supervisor.stop()
    assert supervisor.status()[0].pid is None
