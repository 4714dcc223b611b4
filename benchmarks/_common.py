"""Helpers shared by the benchmark scripts (run a command measured, describe the machine)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path


def run_measured(cmd: list, log: Path, cwd: Path | None = None) -> tuple[float, float]:
    """Run ``cmd`` with its output in ``log``; return (wall seconds, peak RSS of the child in MiB).

    :raises subprocess.CalledProcessError: the command failed (its output is in ``log``).
    """
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise subprocess.CalledProcessError(code, [str(c) for c in cmd], output=f"see {log}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024.0


def machine() -> dict:
    """CPU model, core count, memory and Python/platform of this machine."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "nproc": os.cpu_count(), "memory_gb": mem_gb,
            "python": platform.python_version(), "platform": platform.platform()}
