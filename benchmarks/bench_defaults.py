"""Which OPUS-DSD settings should be the default: the paper's or the ones our results use.

Two settings, everything else equal (the CPU-sized network ``model=opusdsd_cpu``, same data,
seed, epochs and training box):

* ``paper``: the OPUS-DSD paper's optimisation (``+experiment=opusdsd_paper``): Adam lr 1e-4
  with a 0.95 decay per epoch, TV/L1 priors normalised by sum / N, batch 32;
* ``measured``: what the demo, the recovery test and the accuracy benchmark use: lr 1e-3 without
  decay, batch 16, TV/L1 normalised by their mean (the reference code's).

``--model opusdsd --lrs 1e-3 3e-4 1e-4`` runs the measured setting once per learning rate at the
reference widths instead (a run that stops on a non-finite loss is recorded as diverged, with the
guard's message); ``--extra`` adds overrides to every run (e.g. ``trainer.gradient_clip_val=1``).

Each runs ``train.py`` then ``analyze.py`` on the built-in synthetic sets (discrete, continuous
and compositional, SNR 0.05) at a training box of 32, and on the discrete set at box 64; the
scores are the run's ``analysis/metrics.json`` against the ground truth (k-means ARI, AMI,
per-state FSC) plus the final validation loss and wall time. Writes JSON (``--out``) and prints
a Markdown table for ``docs/benchmarks.md``.

Example usage::

    # the full measurement (about 3 h on 2 CPU cores):
    python benchmarks/bench_defaults.py --out docs/bench_defaults.json
    # reduced (about 1 h): fewer particles and epochs
    python benchmarks/bench_defaults.py --n-particles 2000 --epochs 10 --box64-particles 1000 \
        --box64-epochs 6 --out docs/bench_defaults_reduced.json
    # the learning rate of the reference-width network (box 32, 2 epochs of 2,000 particles)
    python benchmarks/bench_defaults.py --model opusdsd --sets discrete --n-particles 2000 \
        --epochs 2 --settings measured --lrs 1e-3 3e-4 1e-4 --out docs/bench_defaults_wide.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from _common import machine, run_measured

REPO = Path(__file__).resolve().parents[1]

SETTINGS = {
    "paper": ["+experiment=opusdsd_paper"],
    "measured": [
        "optim.optimizer.lr=1e-3", "optim.scheduler.gamma=1.0", "data.batch_size=16",
        "loss.tv.normalization=mean", "loss.l1.normalization=mean",
    ],
}
KEYS = ("ari", "ami", "per_state_auc_mean", "per_state_res_0.5_mean", "per_image_fsc_auc_mean")
# Only what the comparison needs: the ground-truth scores (k-means ARI/AMI with k = true
# states, maps at each true state's mean latent) do not depend on these options.
ANALYZE = ["progress=false", "umap.enabled=false", "n_pc_traversals=0", "n_clusters=8",
           "per_image_fsc_samples=50", "oracle=false", "subsets.enabled=false"]


def _guard_message(log: Path) -> str:
    """The error line a failed ``train.py`` printed (the non-finite guard's, for a divergence)."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("Error:")]
    return lines[-1][:300] if lines else f"train.py failed, see {log}"


def run_one(name: str, setting: str, overrides: list[str], workdir: Path) -> dict:
    run_dir = workdir / f"{name}-{setting}"
    cmd = [sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"]
    row = {"set": name, "setting": setting, "command": " ".join(map(str, cmd[1:])), "diverged": False}
    train_log = workdir / f"{name}-{setting}-train.log"
    if (run_dir / "train_metrics.json").is_file():  # finished earlier: reuse (delete to rerun)
        train_s, peak = json.loads((run_dir / "train_metrics.json").read_text())["time/fit_seconds"], 0
    else:
        try:
            train_s, peak = run_measured(cmd, train_log, cwd=REPO)
        except subprocess.CalledProcessError:
            message = _guard_message(train_log)
            if "non-finite" not in message:
                raise
            return {**row, "diverged": True, "error": message, **{k: None for k in KEYS}}
    analyze_s = 0.0
    if not (run_dir / "analysis" / "metrics.json").is_file():  # reuse a finished analysis
        analyze_s, _ = run_measured([sys.executable, "analyze.py", f"run_dir={run_dir}", *ANALYZE],
                                    workdir / f"{name}-{setting}-analyze.log", cwd=REPO)
    gt = json.loads((run_dir / "analysis" / "metrics.json").read_text()).get("ground_truth", {})
    train_metrics = json.loads((run_dir / "train_metrics.json").read_text())
    return {**row, "train_seconds": round(train_s, 1), "analyze_seconds": round(analyze_s, 1),
            "peak_rss_mb": round(peak), "val_loss": train_metrics.get("val/loss"),
            **{k: gt.get(k) for k in KEYS}}


def runs(settings: list[str], lrs: list[float] | None) -> list[tuple[str, list[str]]]:
    """(name, overrides) per run: each setting, and the measured one once per ``lrs`` entry."""
    out = []
    for setting in settings:
        if setting == "measured" and lrs:
            for lr in lrs:
                out.append((f"measured-lr{lr:g}", [*SETTINGS[setting], f"optim.optimizer.lr={lr:g}"]))
        else:
            out.append((setting, SETTINGS[setting]))
    return out


def _fmt(v, d=3) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| data set | settings | ARI | AMI | per-state FSC AUC | per-state FSC=0.5 (Å) | val loss | train (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        setting = r["setting"] + (" (diverged)" if r.get("diverged") else "")
        lines.append(f"| {r['set']} | {setting} | {_fmt(r['ari'])} | {_fmt(r['ami'])} | "
                     f"{_fmt(r['per_state_auc_mean'])} | {_fmt(r['per_state_res_0.5_mean'], 1)} | "
                     f"{_fmt(r.get('val_loss'), 4)} | {_fmt(r.get('train_seconds'), 0)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", nargs="+", default=["discrete", "continuous", "compositional", "discrete_box64"])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--n-particles", type=int, default=5000, help="particles of the box-32 sets")
    p.add_argument("--box64-epochs", type=int, default=15)
    p.add_argument("--box64-particles", type=int, default=5000)
    p.add_argument("--snr", type=float, default=0.05)
    p.add_argument("--model", default="opusdsd_cpu", choices=["opusdsd_cpu", "opusdsd"])
    p.add_argument("--lrs", nargs="+", type=float, default=None,
                   help="run the measured setting once per learning rate")
    p.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    p.add_argument("--tag", default="", help="suffix of the run folders (e.g. for --extra runs)")
    p.add_argument("--workdir", default="logs/bench_defaults")
    p.add_argument("--out", default=None, help="JSON output path")
    p.add_argument("--table", default=None, metavar="JSON", help="only print the table of this file")
    args = p.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())["results"]))
        return
    workdir = REPO / args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    common = ["trainer=cpu", f"model={args.model}", "data.num_workers=0", "data.persistent_workers=false",
              "trainer.enable_progress_bar=false", f"data.particles.snr={args.snr}", *args.extra]
    rows = []
    start = time.perf_counter()
    for name in args.sets:
        kind, box64 = name.removesuffix("_box64"), name.endswith("_box64")
        n, epochs, box = ((args.box64_particles, args.box64_epochs, 64) if box64
                          else (args.n_particles, args.epochs, 32))
        overrides = [*common, f"data.particles.kind={kind}", f"data.particles.n_particles={n}",
                     f"trainer.max_epochs={epochs}", f"data.box_size={box}", f"model.template_size={box}"]
        prefix = f"{name}-n{n}-e{epochs}" + ("" if args.model == "opusdsd_cpu" else f"-{args.model}") + args.tag
        for setting, setting_overrides in runs(args.settings, args.lrs):
            row = {**run_one(prefix, setting, [*overrides, *setting_overrides], workdir), "model": args.model,
                   "epochs": epochs, "n_particles": n, "train_box": box, "date": date.today().isoformat()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"command": "python " + " ".join(sys.argv), "date": date.today().isoformat(), "machine": machine(),
           "settings": SETTINGS, "model": args.model, "extra": args.extra, "wall_seconds": round(time.perf_counter() - start), "results": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print()
    print(markdown(rows))


if __name__ == "__main__":
    main()
