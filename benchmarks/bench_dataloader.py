"""DataLoader throughput and memory of the particle pipeline on stacks of 1 GB, 8 GB, ...

Writes synthetic float32 MRC stacks (Gaussian noise) of the requested total sizes into a
scratch folder once (chunked writes through ``mrcfile.new_mmap``: never more than one chunk in
memory; existing files of the right size are reused), then, for each size, iterates a
``DataLoader(ParticleDataset, batch_sampler=HealpixBatchSampler)`` built exactly as
:class:`hetero.data.datamodule.ParticleDataModule` builds its training loader (Fourier crop off
by default) for ``--seconds`` and reports

* throughput in images/s (and MB/s of pixels), timed from the first batch on;
* memory of the main process plus all DataLoader workers (psutil): peak summed RSS (sampled
  every 0.25 s; counts the file pages a process has mapped, and shared pages once per
  process), peak summed anonymous memory (RSS minus file-backed/shared pages: what the
  processes allocated themselves) and the summed PSS at the end of the run (shared pages split
  between processes; taken once because reading it walks the page tables).

With ``--cache cold`` the stack files are first evicted from the page cache
(``posix_fadvise(DONTNEED)``), so reads go to the disk; ``warm`` runs without eviction (after a
cold run or right after writing, the pages already read are cached).

Example::

    python benchmarks/bench_dataloader.py --box 128 --sizes-gb 1 8 --workers 2 --batch 64 \\
        --out docs/bench_dataloader.json --scratch /work/bench_scratch --delete
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

IMAGES_PER_STACK = 10_000
CHUNK = 1_000


def machine_facts() -> dict:
    import psutil
    import torch
    from _common import machine

    base = machine()
    return {
        "nproc": base["nproc"],
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": base["cpu"],
        "mem_total_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": base["python"],
        "torch": torch.__version__,
        "platform": base["platform"],
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def write_stacks(folder: Path, box: int, size_gb: float, seed: int = 0) -> list[tuple[str, int]]:
    """Stacks totalling ``size_gb`` GiB of float32 ``box^2`` images: ``[(path, n_images)]``."""
    import mrcfile

    n_total = int(size_gb * 2**30 // (box * box * 4))
    folder = folder / f"box{box}_{size_gb:g}gb"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for s, start in enumerate(range(0, n_total, IMAGES_PER_STACK)):
        n = min(IMAGES_PER_STACK, n_total - start)
        path = folder / f"stack{s:04d}.mrcs"
        expected = 1024 + n * box * box * 4
        if not (path.is_file() and path.stat().st_size == expected):
            with mrcfile.new_mmap(path, shape=(n, box, box), mrc_mode=2, overwrite=True) as m:
                m.voxel_size = 1.0
                m.set_image_stack()
                for a in range(0, n, CHUNK):
                    b = min(a + CHUNK, n)
                    m.data[a:b] = rng.standard_normal((b - a, box, box), dtype=np.float32)
                m.flush()
        out.append((str(path), n))
    return out


def evict(paths: list[str]) -> None:
    """Drop the files' pages from the page cache (so the next reads go to disk)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class MemorySampler(threading.Thread):
    """Peak summed RSS and anonymous memory of this process and its children (bytes).

    Sampled from ``/proc/<pid>/statm`` (psutil ``memory_info``: O(1) in the kernel). The summed
    PSS (``smaps_rollup``, which walks the page tables and would slow down memory-mapped reads
    if polled) is taken once, at the end of the run while the workers are still alive.
    """

    def __init__(self, period: float = 0.25) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.period = period
        self.peak = {"rss": 0, "anon": 0}
        self.pss = 0
        self.peak_procs = 0
        self._stop_event = threading.Event()

    def _procs(self):
        return [self.proc, *self.proc.children(recursive=True)]

    def sample(self) -> None:
        import psutil

        procs = self._procs()
        rss = anon = 0
        for p in procs:
            try:
                info = p.memory_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            anon += info.rss - getattr(info, "shared", 0)
        self.peak["rss"] = max(self.peak["rss"], rss)
        self.peak["anon"] = max(self.peak["anon"], anon)
        self.peak_procs = max(self.peak_procs, len(procs))

    def sample_pss(self) -> None:
        import psutil

        total = 0
        for p in self._procs():
            try:
                full = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += getattr(full, "pss", full.rss)
        self.pss = total

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.period)

    def stop(self) -> dict:
        self._stop_event.set()
        self.join()
        self.sample()
        self.sample_pss()
        return {
            "peak_rss_mb": round(self.peak["rss"] / 2**20, 1),
            "peak_anon_mb": round(self.peak["anon"] / 2**20, 1),
            "final_pss_mb": round(self.pss / 2**20, 1),
        }


def run_once(stacks, box, crop_box, workers, batch, seconds, nside=2) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from hetero.data.dataset import ParticleDataset, collate_particles
    from hetero.data.particles import ParticleTable
    from hetero.data.samplers import HealpixBatchSampler
    from hetero.physics.rotations import random_rotations

    paths = np.concatenate([np.full(n, p, dtype=object) for p, n in stacks])
    index = np.concatenate([np.arange(n) for _, n in stacks])
    n = len(index)
    rot = random_rotations(n, generator=torch.Generator().manual_seed(0)).numpy()
    table = ParticleTable(paths, index, box, 1.0, rotations=rot, source="bench")
    dataset = ParticleDataset(table, box_size=crop_box, healpix_nside=nside)
    sampler = HealpixBatchSampler(dataset.pose_classes, batch, seed=0)
    loader = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_particles, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=False,
    )
    mem = MemorySampler()
    mem.start()
    images = 0
    t0 = None
    epoch = 0
    done = False
    while not done:
        sampler.set_epoch(epoch)
        for b in loader:
            if t0 is None:  # exclude worker start-up
                t0 = time.perf_counter()
                continue
            images += b["image"].shape[0]
            if time.perf_counter() - t0 >= seconds:
                done = True
                break
        epoch += 1
    elapsed = time.perf_counter() - t0
    peaks = mem.stop()
    del loader
    out_box = crop_box or box
    return {
        "n_images": n,
        "images_per_s": round(images / elapsed, 1),
        "pixel_mb_per_s": round(images * box * box * 4 / elapsed / 2**20, 1),
        "seconds": round(elapsed, 1),
        "images_read": images,
        "fraction_of_dataset_read": round(images / n, 3),
        "out_box": out_box,
        **peaks,
        "processes": mem.peak_procs,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 8.0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--crop-box", type=int, default=None, help="Fourier-crop to this box (off)")
    ap.add_argument("--cache", nargs="+", default=["cold", "warm"], choices=["cold", "warm"])
    ap.add_argument("--out", default="docs/bench_dataloader.json")
    ap.add_argument("--scratch", default="/tmp/bench_scratch")
    ap.add_argument("--delete", action="store_true", help="delete the scratch stacks at the end")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    facts = machine_facts()
    scratch = Path(args.scratch)
    results = []
    all_paths: list[str] = []
    try:
        for size in args.sizes_gb:
            t = time.perf_counter()
            stacks = write_stacks(scratch, args.box, size)
            all_paths += [p for p, _ in stacks]
            print(f"{size:g} GB: {len(stacks)} stacks ready in {time.perf_counter() - t:.0f} s",
                  file=sys.stderr)
            for cache in args.cache:
                if cache == "cold":
                    evict([p for p, _ in stacks])
                r = run_once(stacks, args.box, args.crop_box, args.workers, args.batch, args.seconds)
                r = {"size_gb": size, "cache": cache, **r}
                print(json.dumps(r), file=sys.stderr)
                results.append(r)
    finally:
        if args.delete:
            for p in all_paths:
                Path(p).unlink(missing_ok=True)
            for d in sorted({Path(p).parent for p in all_paths}):
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()

    report = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": facts,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\nMachine: {facts['nproc']} CPUs ({facts['cpu_model']}), {facts['mem_total_gb']} GB RAM, "
          f"load average {facts['load_average_1_5_15']} before, {report['load_average_after']} after")
    print(f"box {args.box}, batch {args.batch}, {args.workers} workers, "
          f"crop {'off' if not args.crop_box else args.crop_box}\n")
    print("| size (GB) | images | cache | images/s | MB/s | peak RSS (MB) | peak anon (MB) | "
          "final PSS (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['size_gb']:g} | {r['n_images']} | {r['cache']} | {r['images_per_s']:.0f} | "
              f"{r['pixel_mb_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['peak_anon_mb']:.0f} | "
              f"{r['final_pss_mb']:.0f} |")
    return report


if __name__ == "__main__":
    main()
