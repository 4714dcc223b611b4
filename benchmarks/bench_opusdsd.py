"""Training and inference throughput of the OPUS-DSD model (images/s) and peak memory.

Times full optimiser steps (augmentation, encoder, decoder, multi-pose rendering with CTF,
all loss terms, backward, Adam, bank/SNR updates) on synthetic batch-contract data.

Example usage::

    python benchmarks/bench_opusdsd.py --box 64 --widths default
    python benchmarks/bench_opusdsd.py --box 64 --widths narrow
    python benchmarks/bench_opusdsd.py --box 128 --device cuda --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import time

import torch

from hetero.models.opusdsd import OpusDSD
from hetero.physics.ctf import CTF_COLUMNS
from hetero.physics.rotations import random_rotations

WIDTHS = {
    # reference (paper-era code) widths
    "default": dict(encoder_channels=[32, 64, 128, 256, 512, 1024], fc_width=512,
                    decoder_channels=[2048, 1024, 512, 256, 128, 64, 32, 16], decoder_fc_width=512),
    # recommended CPU-demo widths
    "narrow": dict(encoder_channels=[8, 16, 32], fc_width=64,
                   decoder_channels=[64, 32, 16, 8, 4], decoder_fc_width=64),
    # the test-suite widths
    "tiny": dict(encoder_channels=[4, 8, 8], fc_width=32, decoder_channels=[16, 8, 8, 4], decoder_fc_width=32),
}


def make_batch(batch_size: int, box: int, apix: float, device) -> dict[str, torch.Tensor]:
    ctf = dict(defocus_u_angstrom=15000.0, defocus_v_angstrom=14000.0, defocus_angle_deg=30.0, voltage_kv=300.0,
               spherical_aberration_mm=2.7, amplitude_contrast=0.1, phase_shift_deg=0.0, b_factor=0.0, scale=1.0)
    return {
        "image": torch.randn(batch_size, box, box),
        "rotation": random_rotations(batch_size).float(),
        "origin_px": torch.randn(batch_size, 2),
        "ctf": torch.tensor([[ctf[c] for c in CTF_COLUMNS]] * batch_size),
        "apix": torch.full((batch_size,), apix),
        "index": torch.randperm(10 * batch_size)[:batch_size],
        "half": torch.zeros(batch_size, dtype=torch.long),
        "pose_class": torch.zeros(batch_size, dtype=torch.long),
    }


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--box", type=int, default=64, help="training box D")
    p.add_argument("--template", type=int, default=None, help="template size T (default D)")
    p.add_argument("--widths", choices=sorted(WIDTHS), default="default")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--neighbours", type=int, default=8, help="neighbour poses (plus the consensus)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["32", "bf16-mixed"], default="32")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--profile", action="store_true", help="print the top ops of one step")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = OpusDSD(box_size=args.box, apix=4.0, template_size=args.template, n_particles=10 * args.batch_size,
                    n_neighbour_poses=args.neighbours, **WIDTHS[args.widths]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    batches = [
        {k: v.to(device) for k, v in make_batch(args.batch_size, args.box, 4.0, device).items()}
        for _ in range(2)
    ]

    def autocast():
        if args.precision == "bf16-mixed":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(i: int) -> None:
        with autocast():
            loss = model._training_losses(batches[i % 2])["total"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(args.warmup):
        step(i)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.steps):
        step(i)
    sync()
    elapsed = time.perf_counter() - start
    # Inference: the encoder alone (what `analyze`/prediction runs per particle), no gradients.
    model.eval()
    with torch.no_grad(), autocast():
        for i in range(args.warmup):
            model.encode(batches[i % 2])
        sync()
        t_inf = time.perf_counter()
        for i in range(args.steps):
            model.encode(batches[i % 2])
        sync()
    inf_elapsed = time.perf_counter() - t_inf
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    ips = args.steps * args.batch_size / elapsed
    print(
        f"box={args.box} T={model.template_size} C={model.encoder_size} widths={args.widths} "
        f"params={n_params / 1e6:.2f}M batch={args.batch_size} poses={args.neighbours + 1} "
        f"device={device.type} precision={args.precision} threads={torch.get_num_threads()}"
    )
    print(f"train images/s: {ips:.2f}  ({elapsed / args.steps:.3f} s/step)")
    print(f"inference (encode) images/s: {args.steps * args.batch_size / inf_elapsed:.2f}")
    print(f"peak RSS: {peak_rss_mib():.0f} MiB")
    if device.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            step(0)
            sync()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
