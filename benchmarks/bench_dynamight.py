"""Training and inference throughput of ``model=dynamight`` (images/s) and peak memory.

Times full training steps of both half sets on batch-contract data: image preparation (FFT,
recentring, CTF), both encoders, both deformation decoders over all Gaussians, the Gaussian
renderer with CTF, the whitened Fourier data term, KL and the geometric regulariser on the
consensus radius graph, backward and one Adam step; and inference (``predict_step``: both
encoders, own-half deformation RMSD). The consensus fills a sphere of 0.3 box radius (a
realistic Gaussian density and graph size). One configuration per process (clean peak memory).

``--matrix cpu|gpu`` runs the issue's grid, one process per configuration: CPU box 64 with 1,000,
3,000 and 10,000 Gaussians (batch 32, float32); GPU boxes 128, 256, 320 with 10,000 and 30,000
Gaussians (batch 128, bf16-mixed).

Example usage::

    python benchmarks/bench_dynamight.py --box 64 --gaussians 10000 --batch-size 32
    python benchmarks/bench_dynamight.py --matrix cpu --out docs/bench_dynamight_cpu.json
    python benchmarks/bench_dynamight.py --matrix gpu --out docs/bench_dynamight_gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from datetime import date
from pathlib import Path

import torch

from hetero.models.dynamight import DynaMight
from hetero.physics.ctf import CTF_COLUMNS
from hetero.physics.rotations import random_rotations


def make_batch(batch_size: int, box: int, apix: float, device) -> dict[str, torch.Tensor]:
    ctf = dict(defocus_u_angstrom=15000.0, defocus_v_angstrom=14000.0, defocus_angle_deg=30.0, voltage_kv=300.0,
               spherical_aberration_mm=2.7, amplitude_contrast=0.1, phase_shift_deg=0.0, b_factor=0.0, scale=1.0)
    batch = {
        "image": torch.randn(batch_size, box, box),
        "rotation": random_rotations(batch_size).float(),
        "origin_px": torch.randn(batch_size, 2),
        "ctf": torch.tensor([[ctf[c] for c in CTF_COLUMNS]] * batch_size),
        "apix": torch.full((batch_size,), apix),
        "index": torch.arange(batch_size),
        "half": torch.arange(batch_size) % 2,
        "pose_class": torch.zeros(batch_size, dtype=torch.long),
    }
    return {k: v.to(device) for k, v in batch.items()}


def build(args, device) -> DynaMight:
    torch.manual_seed(0)
    model = DynaMight(box_size=args.box, apix=args.apix, n_gaussians=args.gaussians, zdim=args.zdim,
                      n_particles=10 * args.batch_size).to(device)
    with torch.no_grad():
        for vae in model.halves:
            x = torch.randn(args.gaussians, 3)
            x = x / x.norm(dim=1, keepdim=True) * torch.rand(args.gaussians, 1) ** (1 / 3) * 0.3
            vae.consensus.positions.copy_(x.to(device))
            torch.nn.init.normal_(vae.decoder.out.weight, std=0.05)  # a non-trivial deformation
    model.graphs = [model.regularizer.graph(v.consensus.positions_angstrom().detach()) for v in model.halves]
    return model


def train_step(model: DynaMight, opt, batch, autocast) -> None:
    prep = model.prepare(batch)
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for h, vae in enumerate(model.halves):
        sel = prep.half == h
        with autocast():
            out = vae.losses(prep.select(sel), True, model.whitening, model.kl_weight, model.regularizer,
                             model.graphs[h], 1.0)
        total = total + out["total"]
    total.backward()
    opt.step()


def measure(fn, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


MATRIX = {
    "cpu": [dict(box=64, gaussians=g, batch_size=32, device="cpu", precision="32") for g in (1000, 3000, 10000)],
    "gpu": [dict(box=b, gaussians=g, batch_size=128, device="cuda", precision="bf16-mixed")
            for b in (128, 256, 320) for g in (10000, 30000)],
}


def run_matrix(args) -> None:
    """Each configuration of ``MATRIX[args.matrix]`` in its own process, rows merged into ``--out``."""
    import subprocess

    if not args.out:
        raise SystemExit("--matrix needs --out")
    Path(args.out).unlink(missing_ok=True)
    load = [round(v, 2) for v in os.getloadavg()]
    for conf in MATRIX[args.matrix]:
        cmd = [sys.executable, __file__, "--box", str(conf["box"]), "--gaussians", str(conf["gaussians"]),
               "--batch-size", str(conf["batch_size"]), "--device", conf["device"], "--precision",
               conf["precision"], "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", args.out,
               "--merge"] + (["--threads", str(args.threads)] if args.threads else [])
        result = subprocess.run(cmd)
        if result.returncode != 0:  # e.g. out of memory: recorded, the grid goes on
            rows = json.loads(Path(args.out).read_text())["results"] if Path(args.out).exists() else []
            rows.append({**conf, "error": f"exit {result.returncode}"})
            Path(args.out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "results": rows}, indent=2))
    doc = json.loads(Path(args.out).read_text())  # the matrix's own command and the load at its start
    doc.update(command="python " + " ".join(sys.argv), load_average_at_start=load)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--apix", type=float, default=3.0)
    p.add_argument("--gaussians", type=int, default=10000, help="per half set")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (both half sets together)")
    p.add_argument("--zdim", type=int, default=6)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["32", "bf16-mixed"], default="32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profile", action="store_true", help="print the top ops of one training step")
    p.add_argument("--out", default=None, help="JSON file to append this row to (with --merge)")
    p.add_argument("--merge", action="store_true")
    p.add_argument("--matrix", choices=sorted(MATRIX), default=None,
                   help="run the standard grid, one subprocess per configuration")
    args = p.parse_args()
    if args.matrix:
        run_matrix(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(args, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = make_batch(args.batch_size, args.box, args.apix, device)

    def autocast():
        if args.precision == "bf16-mixed":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_s = measure(lambda: train_step(model, opt, batch, autocast), args.steps, args.warmup, device)
    train_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None

    def infer():
        with torch.no_grad(), autocast():
            model.predict_step(batch)

    infer_s = measure(infer, args.steps, 1, device)
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            train_step(model, opt, batch, autocast)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    row = {
        "box": args.box, "gaussians": args.gaussians, "batch_size": args.batch_size, "zdim": args.zdim,
        "device": str(device), "precision": args.precision, "threads": torch.get_num_threads(),
        "edges_per_half": model.graphs[0].n_edges,
        "train_images_per_s": round(args.steps * args.batch_size / train_s, 2),
        "inference_images_per_s": round(args.steps * args.batch_size / infer_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0),
        "peak_cuda_train_mb": None if train_peak is None else round(train_peak),
        "date": date.today().isoformat(),
    }
    if device.type == "cuda":
        row["gpu"] = torch.cuda.get_device_name(device)
    print(json.dumps(row), flush=True)
    if args.out:
        path = Path(args.out)
        rows = json.loads(path.read_text())["results"] if args.merge and path.exists() else []
        sys.path.insert(0, str(Path(__file__).parent))
        from _common import machine

        doc = {"command": "python " + " ".join(sys.argv), "machine": machine(), "results": [*rows, row]}
        path.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
