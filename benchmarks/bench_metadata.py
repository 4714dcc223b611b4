"""Resident memory of the particle metadata as the particle count grows (no pixel data).

For each size a RELION 3.1 ``.star`` file is written once into a scratch folder, over stacks of
1,000 images that are all symbolic links to one simulated stack (so 1M particles cost 1,000
links, not 16 GB of images; only headers and the normalisation sample are read). Each size is
then measured in a fresh process:

* ``read``: seconds and resident memory (``VmRSS``) added by ``read_particles``, per
  particle, next to the bytes the table really holds (numpy arrays plus the deep size of the
  original rows kept for writing subsets);
* ``setup``: the same for the full training data path, ``ParticleDataModule.setup`` (read,
  checks, split, half sets, pose classes, normalisation sample, train/val datasets);
* ``peak``: the process's high-water mark (``VmHWM``) over the baseline, per particle.

Each (size, phase) runs in its own process after a warm-up on a 1,000-particle file.

``--no-release`` repeats the measurement with
:func:`hetero.utils.memory.release_freed_memory` disabled (the behaviour before it existed).

Example usage::

    python benchmarks/bench_metadata.py --sizes 10000 100000 1000000 --scratch /tmp/bench_metadata \\
        --out docs/bench_metadata.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from _common import machine, repeated_table

PER_STACK = 1000


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(key)


def build(scratch: Path, n: int) -> Path:
    """The ``n``-particle star file (made once; stacks are links to one simulated stack)."""
    from hetero.data.io.readers import read_particles
    from hetero.data.io.star import write_star
    from hetero.data.synthetic import SyntheticDataset

    star = scratch / f"n{n}" / "particles.star"
    if star.exists():
        return star
    base = SyntheticDataset(kind="discrete", n_particles=PER_STACK, box_size=32, snr=0.05,
                            pixel_size_angstrom=6.0, cache_dir=str(scratch), name="base")
    table = read_particles(base.ensure())
    source = Path(base.truth_dir) / "particles.mrcs"
    copies = -(-n // PER_STACK)
    paths = []
    for c in range(copies):
        link = star.parent / "stacks" / f"stack{c:05d}.mrcs"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(source)
        paths.append(str(link))

    big = repeated_table(table, paths, PER_STACK, n)
    tmp = star.with_name("particles.tmp.star")
    write_star(tmp, big)
    tmp.rename(star)
    return star


def _table_bytes(table) -> int:
    arrays = ("image_paths", "image_indices", "pixel_size_angstrom", "rotations", "origins_px",
              "ctf", "half_set", "optics_group")
    total = sum(getattr(table, k).nbytes for k in arrays if getattr(table, k) is not None)
    if table.rows is not None:
        total += int(table.rows.memory_usage(deep=True).sum())
    return total


def one(star: Path, warmup_star: Path, phase: str, release: bool) -> dict:
    """Measure one size and phase (``read`` or ``setup``) in this fresh process.

    A warm-up pass over a small star file first loads every lazily imported module and cache,
    and its garbage is released, so the baseline holds everything but this table.
    """
    import gc

    import hetero.data.io.readers as readers
    from hetero.data.datamodule import ParticleDataModule
    from hetero.utils.memory import release_freed_memory

    def datamodule(path: Path):
        dm = ParticleDataModule(particles=str(path), box_size=32, num_workers=0, batch_size=64)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    datamodule(warmup_star)
    gc.collect()
    release_freed_memory()
    if not release:
        readers.release_freed_memory = lambda: []
    base = _status_mb("VmRSS")
    start = time.perf_counter()
    if phase == "read":
        table = readers.read_particles(star)
        n, held = len(table), _table_bytes(table)
    else:
        dm = datamodule(star)
        n, held = len(dm.table), None
    seconds = time.perf_counter() - start
    gc.collect()
    per = 2**20 / n
    return {
        "n_particles": n,
        "phase": phase,
        "release": release,
        "seconds": round(seconds, 2),
        "rss_b_per_particle": round((_status_mb("VmRSS") - base) * per),
        "table_bytes_per_particle": None if held is None else round(held / n),
        "peak_b_per_particle": round((_status_mb("VmHWM") - base) * per),
        "baseline_rss_mb": round(base, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/bench_metadata"))
    parser.add_argument("--no-release", action="store_true",
                        help="also measure with release_freed_memory disabled")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--one", nargs=3, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:  # child process: star, warm-up star, phase
        star, warmup, phase = args.one
        print(json.dumps(one(Path(star), Path(warmup), phase, release=not args.keep)))
        return

    args.scratch.mkdir(parents=True, exist_ok=True)
    warmup = build(args.scratch, PER_STACK)
    rows = []
    for n in args.sizes:
        star = build(args.scratch, n)
        for phase, release in [(p, r) for p in ("read", "setup")
                               for r in ([True, False] if args.no_release else [True])]:
            cmd = [sys.executable, __file__, "--one", str(star), str(warmup), phase]
            cmd += [] if release else ["--keep"]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore"})
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"date": date.today().isoformat(), "machine": machine(),
              "command": " ".join(sys.argv), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n| particles | phase | release | seconds | RSS added (B/particle) | table holds "
          "(B/particle) | peak added (B/particle) |")
    print("|---:|:---|:---:|---:|---:|---:|---:|")
    for r in rows:
        held = "-" if r["table_bytes_per_particle"] is None else f"{r['table_bytes_per_particle']:,}"
        print(f"| {r['n_particles']:,} | {r['phase']} | {'yes' if r['release'] else 'no'} | "
              f"{r['seconds']} | {r['rss_b_per_particle']:,} | {held} | "
              f"{r['peak_b_per_particle']:,} |")

if __name__ == "__main__":
    main()
