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


def record_run(result: dict, threads: int, out: Path | None) -> dict:
    """``result`` with date, commit, threads and machine; printed as JSON and, with ``out``,
    appended to the JSON list in that file."""
    import json
    from datetime import date

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    record = {"date": str(date.today()), "commit": commit, "threads": threads,
              "machine": machine(), **result}
    print(json.dumps(record, indent=1))
    if out is not None:
        runs = json.loads(out.read_text()) if out.is_file() else []
        out.write_text(json.dumps([*runs, record], indent=1) + "\n")
    return record


def repeated_table(table, paths: list[str], per_stack: int, n: int):
    """An ``n``-particle ``ParticleTable`` over ``paths`` (``per_stack`` images each) whose
    metadata repeats ``table``'s rows (``table`` has ``per_stack`` rows)."""
    import numpy as np

    from hetero.data.particles import ParticleTable

    copies = len(paths)

    def rep(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a] * copies)[:n]

    return ParticleTable(
        image_paths=np.repeat(np.array(paths, dtype=object), per_stack)[:n],
        image_indices=rep(table.image_indices), box_size=table.box_size,
        pixel_size_angstrom=rep(table.pixel_size_angstrom), rotations=rep(table.rotations),
        origins_px=rep(table.origins_px), ctf=rep(table.ctf), half_set=rep(table.half_set),
        source=f"{copies} copies of {table.source}",
    )
