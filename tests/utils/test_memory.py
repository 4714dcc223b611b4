"""release_freed_memory(): freed heap pages really go back to the OS, and the particle readers
call it."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from hetero.utils import memory
from hetero.utils.memory import release_freed_memory


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise KeyError("VmRSS")


@pytest.mark.skipif(memory._glibc() is None, reason="needs glibc (malloc_trim)")
def test_fragmented_heap_is_returned():
    """64 KB blocks (below glibc's mmap threshold) interleaved with small live ones: freeing the
    big ones leaves holes that glibc keeps mapped (in a fresh process RSS does not drop at all
    on ``del``) until malloc_trim. Measured against the peak, since in a long-lived process
    some blocks land contiguously and go back to the OS on ``del`` already."""
    big, small = [], []
    for _ in range(2400):  # 150 MB
        big.append(np.ones(8192))  # 64 KB, from the heap
        small.append(np.ones(64))  # keeps each hole from merging with its neighbours
    peak = _rss_mb()
    del big
    assert "glibc" in release_freed_memory()
    after = _rss_mb()
    assert peak - after > 0.8 * 150, (peak, after)
    assert all(float(s[0]) == 1.0 for s in small)  # live memory untouched


def test_arrow_pool_only_when_loaded(monkeypatch):
    monkeypatch.delitem(sys.modules, "pyarrow", raising=False)
    assert "arrow" not in release_freed_memory()
    assert "pyarrow" not in sys.modules  # not imported just to release memory
    pa = pytest.importorskip("pyarrow")
    if not hasattr(pa.default_memory_pool(), "release_unused"):
        pytest.skip("pyarrow too old for release_unused")
    assert "arrow" in release_freed_memory()


def test_read_particles_releases_parser_memory(monkeypatch, conformance_dir):
    import hetero.data.io.readers as readers

    calls = []
    monkeypatch.setattr(readers, "release_freed_memory", lambda: calls.append(1) or [])
    table = readers.read_particles(conformance_dir / "relion31.star")
    assert len(table) > 0 and calls == [1]
