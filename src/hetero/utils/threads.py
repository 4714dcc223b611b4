"""How many CPU threads a training process should use, from the cores it may actually run on.

torch's default thread count is the number of CPUs in the process' affinity mask; it ignores
a cgroup CPU quota (containers, SLURM with ``ConstrainCores``-less setups, CI runners) and the
other processes of the same run (DDP ranks on CPU). On a machine whose cores are shared that
oversubscribes them: measured 2.0-2.6 images/s with torch's default against 9-11 images/s with
one thread per process under the same load (issue #18). :func:`usable_cpus` reads both limits
and :func:`configure_threads` divides the result among the run's processes, dropping to one
thread per process when other processes already keep those CPUs busy (load average): OpenMP
threads wait for each other at every parallel region, so one preempted thread stalls them all.

Example usage::

    info = configure_threads("auto", processes=2)   # {"threads": 1, "usable_cpus": 2.0, ...}
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["busy_cpus", "configure_threads", "cgroup_cpu_quota", "usable_cpus"]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """Controller -> cgroup path of this process (``""`` key for cgroup v2)."""
    out: dict[str, str] = {}
    text = _read(proc_cgroup) or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for ctrl in parts[1].split(","):
                out[ctrl] = parts[2]
    return out


def cgroup_cpu_quota(
    root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup"
) -> float | None:
    """The CPU quota of this process' cgroup in CPUs (``quota / period``), or ``None`` if none.

    Reads cgroup v2 ``cpu.max`` and v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` along the
    process' cgroup path (from ``proc_cgroup``) and its parents; the tightest limit wins.
    """
    root = Path(root)
    paths = _cgroup_paths(Path(proc_cgroup))
    limits: list[float] = []

    def walk(base: Path, rel: str):
        rel_path = Path(rel.lstrip("/")) if rel else Path()
        while True:
            yield base / rel_path
            if rel_path == Path() or str(rel_path) == ".":
                return
            rel_path = rel_path.parent

    if "" in paths:  # v2
        for folder in walk(root, paths[""]):
            text = _read(folder / "cpu.max")
            if text:
                quota, _, period = text.partition(" ")
                if quota != "max" and period:
                    limits.append(int(quota) / int(period))
    for name in ("cpu", "cpu,cpuacct"):
        base = root / name
        if "cpu" not in paths or not base.is_dir():
            continue
        for folder in walk(base, paths["cpu"]):
            quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            if quota and period and int(quota) > 0 and int(period) > 0:
                limits.append(int(quota) / int(period))
        break
    return min(limits) if limits else None


def usable_cpus() -> tuple[float, str]:
    """CPUs this process may use and where that number came from.

    :return: ``(cpus, source)``: the smaller of the affinity mask's size and the cgroup quota
        (fractional quotas are kept), ``source`` naming which one limited it.
    """
    try:
        affinity = len(os.sched_getaffinity(0))
        source = "CPU affinity"
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
        source = "os.cpu_count()"
    quota = cgroup_cpu_quota()
    if quota is not None and quota < affinity:
        return quota, f"cgroup CPU quota ({quota:g} CPUs; affinity {affinity})"
    return float(affinity), source


def busy_cpus(cpus: float) -> float:
    """How many of this process' ``cpus`` other processes keep busy: the 1-minute load average
    scaled to the share of the machine's CPUs this process may use (0 when unknown)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0
    total = os.cpu_count() or cpus
    return load * min(cpus / total, 1.0)


def configure_threads(threads: int | str | None = "auto", processes: int = 1) -> dict:
    """Set torch's intra-op threads for this process (and ``OMP_NUM_THREADS`` for the processes
    it starts: DDP ranks, which would otherwise each take every core).

    :param threads: a positive number, or ``"auto"`` / ``None``: the usable CPUs (see
        :func:`usable_cpus`) divided among ``processes``, at least 1; 1 when other processes
        already keep those CPUs busy (:func:`busy_cpus`; on 2 shared cores one thread trained
        OPUS-DSD 3-5 x faster than two, docs/benchmarks.md).
    :param processes: training processes sharing this machine's usable CPUs (DDP ranks per
        node on CPU; 1 on GPU).
    :return: ``{"threads", "usable_cpus", "source", "processes"}`` for logging.
    :raises ConfigError: (a ``ValueError``) ``threads`` is neither ``"auto"``/``None`` nor a
        positive integer.
    """
    import torch

    cpus, source = usable_cpus()
    processes = max(int(processes), 1)
    if threads in (None, "auto"):
        n = max(1, math.floor(cpus / processes))
        how = f"auto: {cpus:g} usable CPUs ({source}) / {processes} process(es)"
        busy = busy_cpus(cpus)
        if n > 1 and busy >= cpus - 0.5:
            n = 1
            how += (f"; busy machine (load {busy:.1f} on these {cpus:g} CPUs), so 1 thread: "
                    "several would wait on each other")
    else:
        try:
            n = int(threads)
        except (TypeError, ValueError):
            n = 0
        if n < 1 or str(threads).strip() != str(n):
            from hetero.utils.errors import ConfigError

            raise ConfigError(f"threads must be 'auto' or a positive integer, got threads={threads!r}")
        how = "set by threads="
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    return {"threads": n, "usable_cpus": cpus, "source": source, "processes": processes, "how": how}
