"""How busy this machine is while a benchmark runs: shared by the benchmark scripts (they run
from this folder, so `from machine_load import ...` finds it)."""

from __future__ import annotations

from pathlib import Path


def cpu_pressure_us() -> float | None:
    """Total microseconds in which some task in this machine waited for a CPU (Linux PSI), or None.
    Alone, a benchmark leaves it flat; when other processes compete for the cores, it grows."""
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some"):
                return float(line.split("total=")[1])
    except (OSError, IndexError, ValueError):
        pass
    return None


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")
