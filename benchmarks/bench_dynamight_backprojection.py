"""Speed of DynaMight's deformed weighted backprojection (hetero.models.dynamight.backprojection).

Per batch, what the analysis step does for each particle: the half set's decoder deforms the
consensus Gaussians (``--gaussians``, ``zdim`` 6, reference decoder 8 x 32), the local rigid
motions of ``--regions`` regions are fitted (Kabsch), and the CTF-weighted image is inserted into
every region's accumulator at its corrected pose; the rigid backprojection (one accumulator) is
timed beside it. Reported: images/s of the deformed and of the rigid insertion (median of
``--repeats`` batches after a warm-up), and the time of one half map (the regions' two
reconstructions each, FSC prior included) -- on ``--device`` (cpu or cuda), float32.

Example usage (CPU, about 1 min at box 128 and 4 min at box 256 on 2 quiet cores)::

    python benchmarks/bench_dynamight_backprojection.py --box 128 --regions 8 --out docs/bench_dynamight_backprojection.json
    python benchmarks/bench_dynamight_backprojection.py --box 256 --regions 4 --pad 1 --batch 16
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _common import record_run

from hetero.models.dynamight.backprojection import (
    DeformedBackprojection,
    local_rigid_transforms,
    make_regions,
    reconstruct_half_maps,
)
from hetero.models.dynamight.half import HalfSetVAE
from hetero.physics.ctf import compute_ctf
from hetero.physics.rotations import random_rotations


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(box: int, batch: int, regions: int, pad: int, gaussians: int, repeats: int, device: str) -> dict:
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    apix = 1.5
    vae = HalfSetVAE(box, apix, 6, gaussians).to(dev).eval()
    with torch.no_grad():
        vae.consensus.positions.copy_((torch.rand(gaussians, 3, generator=g) - 0.5).to(dev) * 0.5)
        torch.nn.init.normal_(vae.decoder.out.weight, std=0.05)
    rest = vae.consensus.positions_angstrom().detach()
    reg = make_regions(rest.cpu(), regions)
    assignment = reg.assignment.to(dev)
    images = torch.randn(batch, box, box, generator=g).to(dev)
    rot = random_rotations(batch, generator=g).float().to(dev)
    shifts = ((torch.rand(batch, 2, generator=g) - 0.5) * 6).to(dev)
    df = (8000 + 17000 * torch.rand(batch, generator=g, dtype=torch.float64)).to(dev)
    ctf = compute_ctf(box, apix, df, df - 500, 30.0, 300.0, 2.7, 0.1).float().to(dev)
    z = torch.randn(batch, 6, generator=g).to(dev)
    deformed_bp = DeformedBackprojection(box, regions, pad, device=dev)
    rigid_bp = DeformedBackprojection(box, 1, pad, device=dev)

    @torch.no_grad()
    def deformed() -> None:
        positions, _ = vae.deformed(z)
        q, s = local_rigid_transforms(rest, vae.consensus.positions_angstrom(positions), assignment, regions)
        deformed_bp.add(images, rot, shifts, ctf, q, s / apix)

    def rigid() -> None:
        rigid_bp.add(images, rot, shifts, ctf)

    def half_map() -> None:
        reconstruct_half_maps([deformed_bp, deformed_bp], reg.weights(box, apix, device=dev))

    d_s = _median_seconds(deformed, repeats, dev)
    r_s = _median_seconds(rigid, repeats, dev)
    start = time.perf_counter()
    half_map()
    _sync(dev)
    maps_s = (time.perf_counter() - start) / 2
    out = {"box": box, "batch": batch, "regions": regions, "pad_factor": pad, "gaussians": gaussians,
           "device": str(dev), "deformed_images_per_second": batch / d_s,
           "rigid_images_per_second": batch / r_s, "half_map_seconds": maps_s}
    if dev.type == "cuda":
        out["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--regions", type=int, default=8)
    parser.add_argument("--pad", type=int, default=2)
    parser.add_argument("--gaussians", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = measure(args.box, args.batch, args.regions, args.pad, args.gaussians, args.repeats, args.device)
    record_run(result, args.threads, args.out)


if __name__ == "__main__":
    main()
