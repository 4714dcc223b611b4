"""Scaling with the particle count: start-up, time per epoch and resident memory, 10k -> 1M.

Writes the datasets once into a scratch folder: a simulated 10,000-particle set (the built-in
synthetic discrete set at ``--box``, SNR 0.05), then for every size a RELION 3.1 ``.star`` over
copies of its stack (stacks of 10,000 images each, as RELION writes many stacks; poses and CTF
repeat). Each size then runs in a fresh process that drives the real training stack, built from
the Hydra config exactly as ``train.py data=custom data.particles=<star>`` builds it
(``ParticleDataModule`` with memory-mapped stacks, Fourier crop to ``--train-box``, the HEALPix
batch sampler, 2 loader workers, ``model=opusdsd_cpu``), and measures:

* ``setup_s``: reading and checking the star file and stacks, splitting, the pose classes,
  the normalisation sample (what happens before the first step);
* data loader alone: images/s of the training loader for ``--loader-seconds`` after the stack
  files were evicted from the page cache (cold reads);
* training: images/s of full optimiser steps (after ``--warmup`` steps), and inference
  (``model.encode``) images/s;
* time per epoch, projected from those steady-state rates (``n_train / rate``): a full epoch
  of 1M images would take hours on 2 CPU cores;
* memory: peak summed RSS and anonymous memory of the process and its loader workers (psutil,
  every 0.25 s), plus the RSS after setup.

Example usage::

    python benchmarks/bench_scaling.py --sizes 10000 100000 1000000 --scratch /work/bench_scaling \\
        --out docs/bench_scaling.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from _common import machine, repeated_table
from bench_dataloader import MemorySampler, evict

REPO = Path(__file__).resolve().parents[1]
PER_STACK = 10_000


def build(scratch: Path, sizes: list[int], box: int, apix: float) -> dict[int, Path]:
    """Star files of every size over copies of one simulated stack (made once, then reused)."""
    from hetero.data.io.readers import read_particles
    from hetero.data.io.star import write_star
    from hetero.data.synthetic import SyntheticDataset

    base = SyntheticDataset(kind="discrete", n_particles=PER_STACK, box_size=box, snr=0.05,
                            pixel_size_angstrom=apix, cache_dir=str(scratch), name=f"base-d{box}")
    table = read_particles(base.ensure())
    stars = {}
    for n in sizes:
        folder = scratch / f"n{n}"
        star = folder / "particles.star"
        stars[n] = star
        if star.exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        copies = math.ceil(n / PER_STACK)
        paths = []
        for c in range(copies):
            dst = folder / f"stack{c:04d}.mrcs"
            if not dst.exists():
                shutil.copyfile(Path(base.truth_dir) / "particles.mrcs", dst.with_suffix(".tmp"))
                dst.with_suffix(".tmp").rename(dst)
            paths.append(str(dst))

        big = repeated_table(table, paths, PER_STACK, n)
        write_star(folder / "particles.tmp.star", big)
        (folder / "particles.tmp.star").rename(star)
    return stars


def _rate(times: list[float], batch: int) -> float:
    return (len(times) - 1) * batch / (times[-1] - times[0]) if len(times) > 1 else float("nan")


def one(star: Path, args) -> dict:
    """Measure one size (runs in its own process)."""
    import lightning as L
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    mem = MemorySampler()
    mem.start()
    run_dir = Path(args.scratch) / "runs" / star.parent.name
    overrides = [
        "data=custom", f"data.particles={star}", f"data.box_size={args.train_box}",
        f"data.batch_size={args.batch}", f"data.num_workers={args.workers}", "model=opusdsd_cpu",
        f"model.template_size={args.train_box}", f"paths.output_dir={run_dir}",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    out: dict = {"n_particles": None}
    start = time.perf_counter()
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    info = dm.info()
    out["setup_s"] = round(time.perf_counter() - start, 1)
    out["n_particles"], out["n_train"] = info["n_particles"], info["n_train"]
    mem.sample()
    out["rss_after_setup_mb"] = round(mem.peak["rss"] / 2**20, 1)

    # Data loader alone, cold page cache.
    evict(sorted({str(p) for p in Path(star).parent.glob("*.mrcs")}))
    loader = dm.train_dataloader()
    times: list[float] = []
    for _ in loader:
        times.append(time.perf_counter())
        if times[-1] - times[0] >= args.loader_seconds:
            break
    out["loader_images_per_s"] = round(_rate(times, args.batch), 1)
    del loader

    # Training steps.
    model = instantiate(cfg.model, **info)
    step_times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer, *a, **k):
            if trainer.global_step > args.warmup:
                step_times.append(time.perf_counter())

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.warmup + args.steps + 1,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Timer()])
    trainer.fit(model, datamodule=dm)
    out["train_images_per_s"] = round(_rate(step_times, args.batch), 1)

    # Inference (encoder only), on the prediction loader.
    model.eval()
    inf_times: list[float] = []
    with torch.no_grad():
        for i, batch in enumerate(dm.predict_dataloader()):
            model.encode(batch)
            inf_times.append(time.perf_counter())
            if i >= args.warmup + args.steps:
                break
    out["inference_images_per_s"] = round(_rate(inf_times[args.warmup:], dm.val_batch_size), 1)
    out["epoch_s_projected_train"] = round(out["n_train"] / out["train_images_per_s"], 1)
    out["epoch_s_projected_loader"] = round(out["n_train"] / out["loader_images_per_s"], 1)
    out.update(mem.stop())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--box", type=int, default=64, help="box of the stacks on disk")
    p.add_argument("--apix", type=float, default=3.0, help="pixel size of the stacks (Å)")
    p.add_argument("--train-box", type=int, default=32, help="Fourier crop for training")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=100, help="timed training / inference steps")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--loader-seconds", type=float, default=20.0)
    p.add_argument("--scratch", default="/tmp/bench_scaling")
    p.add_argument("--out", default=None)
    p.add_argument("--build-only", action="store_true", help="write the datasets and stop")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(Path(args.one), args)), flush=True)
        return
    scratch = Path(args.scratch)
    t = time.perf_counter()
    stars = build(scratch, args.sizes, args.box, args.apix)
    print(f"datasets ready in {time.perf_counter() - t:.0f} s", flush=True)
    if args.build_only:
        return
    rows = []
    for n, star in stars.items():
        cmd = [sys.executable, __file__, "--one", str(star), *sys.argv[1:]]
        cmd = [c for c in cmd if c != "--build-only"]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
        if res.returncode or not line:
            raise SystemExit(f"size {n} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        rows.append(json.loads(line[-1][7:]))
        print(json.dumps(rows[-1]), flush=True)
    out = {"command": "python " + " ".join(sys.argv), "date": date.today().isoformat(),
           "machine": machine(), "settings": {k: v for k, v in vars(args).items() if k != "one"},
           "results": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print("\n| particles | setup (s) | loader img/s | train img/s | inference img/s | epoch (train, projected) "
          "| peak RSS (MB) | peak anon (MB) | RSS after setup (MB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n_particles']:,} | {r['setup_s']} | {r['loader_images_per_s']:,} | {r['train_images_per_s']} | "
              f"{r['inference_images_per_s']} | {r['epoch_s_projected_train'] / 3600:.2f} h | {r['peak_rss_mb']:,} | "
              f"{r['peak_anon_mb']:,} | {r['rss_after_setup_mb']:,} |")


if __name__ == "__main__":
    main()
