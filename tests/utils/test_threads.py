"""Thread count from CPU affinity and cgroup quotas (hetero.utils.threads)."""

from __future__ import annotations

import os

import pytest
import torch

from hetero.utils import threads
from hetero.utils.threads import cgroup_cpu_quota, configure_threads


def _files(root, entries: dict[str, str]) -> None:
    for rel, text in entries.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_cgroup_v2_quota_tightest_along_the_path(tmp_path):
    _files(tmp_path, {"proc": "0::/user.slice/job7\n", "fs/cpu.max": "max 100000\n",
                      "fs/user.slice/cpu.max": "400000 100000\n",
                      "fs/user.slice/job7/cpu.max": "150000 100000\n"})
    assert cgroup_cpu_quota(tmp_path / "fs", tmp_path / "proc") == pytest.approx(1.5)


def test_cgroup_v1_quota_and_no_limit(tmp_path):
    _files(tmp_path, {"proc": "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n",
                      "fs/cpu/cpu.cfs_quota_us": "-1\n", "fs/cpu/cpu.cfs_period_us": "100000\n",
                      "fs/cpu/docker/abc/cpu.cfs_quota_us": "300000\n",
                      "fs/cpu/docker/abc/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_quota(tmp_path / "fs", tmp_path / "proc") == pytest.approx(3.0)
    _files(tmp_path, {"fs/cpu/docker/abc/cpu.cfs_quota_us": "-1\n"})
    assert cgroup_cpu_quota(tmp_path / "fs", tmp_path / "proc") is None


@pytest.fixture()
def restore_threads():
    n, env = torch.get_num_threads(), dict(os.environ)
    yield
    torch.set_num_threads(n)
    os.environ.clear()
    os.environ.update(env)


def test_configure_threads_divides_usable_cpus_among_processes(monkeypatch, restore_threads):
    monkeypatch.setattr(threads, "usable_cpus", lambda: (8.0, "cgroup CPU quota"))
    monkeypatch.setattr(threads, "busy_cpus", lambda cpus: 0.0)
    info = configure_threads("auto", processes=3)
    assert info["threads"] == 2 == torch.get_num_threads() and os.environ["OMP_NUM_THREADS"] == "2"
    assert "cgroup CPU quota" in info["how"]
    monkeypatch.setattr(threads, "busy_cpus", lambda cpus: 7.9)  # others keep the CPUs busy
    assert configure_threads("auto", processes=1)["threads"] == 1
    assert configure_threads(3)["threads"] == 3 == torch.get_num_threads()
    for bad in (0, "two", 1.5):
        with pytest.raises(ValueError, match="threads must be"):
            configure_threads(bad)
