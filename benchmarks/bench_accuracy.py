"""Accuracy against the synthetic ground truth: OPUS-DSD vs the homogeneous floor, same data.

Runs ``train.py`` then ``analyze.py`` for each model on one built-in synthetic dataset and
collects, from each run's ``analysis/metrics.json``: k-means ARI/AMI (k = true states), the
per-state FSC (map decoded at each state's mean latent vs the true volume: AUC and the 0.5
crossing in Å), the CryoBench per-image FSC AUC, plus wall time and peak resident memory.
Writes a JSON file and prints a Markdown table for ``docs/benchmarks.md``.

Example usage::

    # the default discrete set (8 states, 5000 particles, box 64, SNR 0.05), trained at box 32
    python benchmarks/bench_accuracy.py --out docs/bench_accuracy_discrete.json
    python benchmarks/bench_accuracy.py --epochs 30 --train-box 64 --extra data.particles.snr=0.01
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The CPU-sized OPUS-DSD (narrow networks, 2 neighbour poses) with the demo's short-run settings.
OPUSDSD = [
    "model=opusdsd_cpu",
    "optim.optimizer.lr=1e-3",
    "optim.scheduler.gamma=1.0",
    "loss.tv.normalization=mean",
    "loss.l1.normalization=mean",
]
HOMOGENEOUS = ["model=homogeneous", "optim.optimizer.lr=1e-3"]


def run(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as fh:
        subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", default="discrete", choices=["discrete", "continuous", "compositional"])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--train-box", type=int, default=32, help="data.box_size (Fourier crop)")
    p.add_argument("--models", nargs="+", default=["opusdsd", "homogeneous"])
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    p.add_argument("--workdir", default="logs/bench_accuracy")
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args()

    common = [
        "trainer=cpu", f"trainer.max_epochs={args.epochs}", f"data.particles.kind={args.kind}",
        f"data.box_size={args.train_box}", f"model.template_size={args.train_box}",
        "data.batch_size=16", "data.num_workers=0", "data.persistent_workers=false",
        "trainer.enable_progress_bar=false", "extras.print_config=false", *args.extra,
    ]
    results = []
    for name in args.models:
        run_dir = REPO / args.workdir / f"{args.kind}-{name}"
        overrides = (OPUSDSD if name == "opusdsd" else HOMOGENEOUS) + common + [f"hydra.run.dir={run_dir}"]
        (REPO / args.workdir).mkdir(parents=True, exist_ok=True)
        train_s = run([sys.executable, "train.py", *overrides], REPO / args.workdir / f"{name}-train.log")
        analyze_s = run([sys.executable, "analyze.py", f"run_dir={run_dir}", "progress=false"],
                        REPO / args.workdir / f"{name}-analyze.log")
        metrics = json.loads((run_dir / "analysis" / "metrics.json").read_text())
        gt = metrics.get("ground_truth", {})
        results.append({
            "model": name, "train_seconds": round(train_s, 1), "analyze_seconds": round(analyze_s, 1),
            "ari": gt.get("ari"), "ami": gt.get("ami"),
            "per_state_auc_mean": gt.get("per_state_auc_mean"),
            "per_state_res_0.5_mean": gt.get("per_state_res_0.5_mean"),
            "per_image_fsc_auc_mean": gt.get("per_image_fsc_auc_mean"),
            "neighbourhood_similarity": gt.get("neighbourhood_similarity"),
            "auc_ceiling": gt.get("auc_ceiling"),
        })
        print(json.dumps(results[-1]), flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out = {
        "command": "python " + " ".join(sys.argv),
        "date": date.today().isoformat(),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "settings": {"kind": args.kind, "epochs": args.epochs, "train_box": args.train_box, "extra": args.extra},
        "peak_rss_mb_largest_child": round(peak_mb),
        "results": results,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print("\n| model | ARI | AMI | per-state FSC AUC | per-state FSC=0.5 (Å) | per-image FSC AUC | train (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
        print(f"| {r['model']} | {f(r['ari'])} | {f(r['ami'])} | {f(r['per_state_auc_mean'])} | "
              f"{f(r['per_state_res_0.5_mean'], 1)} | {f(r['per_image_fsc_auc_mean'])} | {r['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
