"""Speed of :class:`hetero.physics.reconstruction.BackprojectionAccumulator`.

Times ``add()`` of one batch (default 256 images at box 64, pad 2, float64, with a CTF of
8,000-25,000 Å defocus evaluated on the grid ``acc.ctf_size``) and ``reconstruct()``, as the
median of ``--repeats`` runs after one warm-up, on the CPU threads given (default 2).

Example usage::

    python benchmarks/bench_backprojection.py --box 64 --batch 256 --repeats 5 \\
        --out docs/bench_backprojection.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _common import record_run

from hetero.physics.ctf import compute_ctf
from hetero.physics.reconstruction import BackprojectionAccumulator
from hetero.physics.rotations import random_rotations


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(box: int, batch: int, pad: int, repeats: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, box, box, generator=g, dtype=dtype)
    rot = random_rotations(batch, generator=g).to(dtype)
    shifts = (torch.rand(batch, 2, generator=g, dtype=dtype) - 0.5) * 6
    acc = BackprojectionAccumulator(box, pad_factor=pad, dtype=dtype)
    df = 8000 + 17000 * torch.rand(batch, generator=g, dtype=torch.float64)
    ctf = compute_ctf(acc.ctf_size, 2.0, df, df - 500, 30.0, 300.0, 2.7, 0.1, dtype=dtype)

    def add() -> None:
        acc.add(images, rot, shifts, ctf)

    add_s = _median_seconds(add, repeats)
    rec_s = _median_seconds(lambda: acc.reconstruct(), repeats)
    return {"box": box, "batch": batch, "pad_factor": pad, "dtype": str(dtype),
            "ctf_size": acc.ctf_size, "add_seconds": add_s, "images_per_second": batch / add_s,
            "reconstruct_seconds": rec_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--pad", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--float32", action="store_true", help="accumulate in float32")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.float32 else torch.float64
    result = measure(args.box, args.batch, args.pad, args.repeats, dtype)
    record_run(result, args.threads, args.out)


if __name__ == "__main__":
    main()
