"""Accuracy against the synthetic ground truth: hetero's models, cryoDRGN and the oracle, same data.

For one built-in synthetic dataset (kind, SNR) this runs, each on the same particles, poses
and CTF:

* ``opusdsd`` / ``dynamight`` / ``homogeneous``: ``train.py`` then ``analyze.py``; the scores
  come from the run's ``analysis/metrics.json`` (the homogeneous map is the floor: no
  heterogeneity at all; DynaMight's latents are the common latent space of its two half sets,
  decoded by half set 1);
* ``cryodrgn``: ``cryodrgn train_vae`` in its own virtual environment, scored with the same
  metric functions (see ``peer_cryodrgn.py``);
* ``oracle``: the physical limit of classification (:mod:`hetero.data.synthetic.oracle`).

The maps of the true states are also compared (second table, from the same analyses): the map
*decoded* at each state's mean latent (limited to the training box's Nyquist) against the map
*reconstructed* from the particles of the k-means cluster holding most of the state (original
box, half maps), the reconstruction from all particles (consensus) and from exactly the state's
particles (perfect classification), each by FSC against the true map.

Reported per method: k-means ARI/AMI (k = true states; on the continuous set the states are the
ground truth's bins of t), ARI as a fraction of the oracle's, per-state FSC AUC and FSC=0.5 of
maps decoded at each state's mean latent, the CryoBench per-image FSC AUC, the neighbourhood
similarity (continuous set), wall time and peak resident memory. All methods get the same
epochs, latent dimension (8) and training box. Writes JSON (``--out``; ``--merge`` keeps the
rows of methods not run this time) and prints a Markdown table for ``docs/benchmarks.md``.

Example usage::

    python benchmarks/bench_accuracy.py --epochs 15 --out docs/bench_accuracy_discrete.json
    python benchmarks/bench_accuracy.py --kind continuous --epochs 15 --out docs/bench_accuracy_continuous.json
    python benchmarks/bench_accuracy.py --snr 0.01 --models cryodrgn oracle --out x.json --merge
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
from _common import machine, run_measured

REPO = Path(__file__).resolve().parents[1]
MODELS = ("opusdsd", "dynamight", "homogeneous", "cryodrgn", "oracle")

# The CPU-sized OPUS-DSD (narrow networks, 2 neighbour poses) with the demo's short-run settings.
OPUSDSD = [
    "model=opusdsd_cpu",
    "optim.optimizer.lr=1e-3",
    "optim.scheduler.gamma=1.0",
    "loss.tv.normalization=mean",
    "loss.l1.normalization=mean",
]
HOMOGENEOUS = ["model=homogeneous", "optim.optimizer.lr=1e-3"]
# The CPU-sized DynaMight (500 Gaussians per half set, network lr 3e-3), latent dimension 8 like
# the others.
DYNAMIGHT = ["model=dynamight_cpu", "model.zdim=8"]
HETERO = {"opusdsd": OPUSDSD, "homogeneous": HOMOGENEOUS, "dynamight": DYNAMIGHT}
# Per-model batch sizes (after the common overrides). DynaMight: the reference trains at 128 and
# model=dynamight_cpu's learning rates (3e-3) were set at 64; at 16 and SNR 0.05 the gradient
# noise of each Adam step kept the latent at the prior (docs/benchmarks.md, DynaMight section).
BATCH = {"dynamight": 64}
KEYS = ("ari", "ami", "per_state_auc_mean", "per_state_res_0.5_mean", "per_state_res_0.143_mean",
        "per_image_fsc_auc_mean", "neighbourhood_similarity", "auc_ceiling", "reconstructed", "closer_to_truth")


def synthetic_dataset(overrides: list[str]):
    """The :class:`SyntheticDataset` that ``train.py <overrides>`` would use (generated)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    ds = instantiate(cfg.data.particles)
    ds.ensure()
    return ds


def run_hetero(name: str, common: list[str], workdir: Path, tag: str) -> dict:
    run_dir = workdir / f"{tag}-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run (train.py refuses to reuse a run's folder)
    batch = [f"data.batch_size={BATCH[name]}"] if name in BATCH else []
    overrides = HETERO[name] + common + batch + [f"hydra.run.dir={run_dir}"]
    train_s, peak = run_measured([sys.executable, "train.py", *overrides], workdir / f"{tag}-{name}-train.log",
                                 cwd=REPO)
    analyze_s, _ = run_measured([sys.executable, "analyze.py", f"run_dir={run_dir}", "progress=false"],
                                workdir / f"{tag}-{name}-analyze.log", cwd=REPO)
    gt = json.loads((run_dir / "analysis" / "metrics.json").read_text()).get("ground_truth", {})
    return {"model": name, "train_seconds": round(train_s, 1), "analyze_seconds": round(analyze_s, 1),
            "peak_rss_mb": round(peak), **{k: gt.get(k) for k in KEYS}}


def run_oracle(dataset) -> dict:
    from hetero.data.synthetic.oracle import oracle_assignment

    start = time.perf_counter()
    res = oracle_assignment(dataset)
    row = {"model": "oracle", "seconds": round(time.perf_counter() - start, 1),
           **{k: res[k] for k in ("ari", "ami", "accuracy", "snr_box")}}
    if "t" in res:  # continuous: the estimated hinge parameter is the oracle's 1-D latent space
        from hetero.analysis.metrics import neighbourhood_scores

        t_true = np.load(Path(dataset.truth_dir) / "truth.npz")["t"]
        row.update(t_rmse=res["t_rmse"], t_pearson=res["t_pearson"],
                   neighbourhood_similarity=neighbourhood_scores(res["t"][:, None], t_true))
    return row


def _fmt(v, d=3) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def markdown(results: list[dict]) -> str:
    oracle = next((r for r in results if r["model"] == "oracle"), None)
    lines = ["| method | ARI | ARI / oracle | AMI | per-state FSC AUC | per-state FSC=0.5 (Å) | "
             "per-image FSC AUC | neighbourhood sim. (1 %) | train (s) | peak RSS (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        frac = (r["ari"] / oracle["ari"] if oracle and r.get("ari") is not None and oracle["ari"] > 0 else None)
        ns = r.get("neighbourhood_similarity") or {}
        ns1 = ns.get("0.01", {}).get("similarity") if isinstance(ns, dict) else None
        train = r.get("train_seconds", r.get("seconds"))
        lines.append(
            f"| {r['model']} | {_fmt(r.get('ari'))} | {_fmt(frac, 2)} | {_fmt(r.get('ami'))} | "
            f"{_fmt(r.get('per_state_auc_mean'))} | {_fmt(r.get('per_state_res_0.5_mean'), 1)} | "
            f"{_fmt(r.get('per_image_fsc_auc_mean'))} | {_fmt(ns1)} | {_fmt(train, 0)} | "
            f"{r.get('peak_rss_mb', '-')} |")
    return "\n".join(lines)


def maps_markdown(results: list[dict]) -> str:
    """Decoded vs reconstructed maps of the true states against the truth (hetero rows only)."""
    lines = ["| method | map of each true state | FSC AUC vs truth | FSC=0.5 (Å) | FSC=0.143 (Å) |",
             "|---|---|---:|---:|---:|"]
    names = {"clusters": "reconstructed from its majority cluster's particles",
             "consensus": "reconstructed from all particles (consensus)",
             "truth_states": "reconstructed from its own particles (perfect classification)"}
    for r in results:
        if r.get("per_state_auc_mean") is None:
            continue
        lines.append(f"| {r['model']} | decoded at its mean latent | {_fmt(r['per_state_auc_mean'])} | "
                     f"{_fmt(r.get('per_state_res_0.5_mean'), 1)} | {_fmt(r.get('per_state_res_0.143_mean'), 1)} |")
        for kind, s in (r.get("reconstructed") or {}).items():
            lines.append(f"| {r['model']} | {names.get(kind, kind)} | {_fmt(s['auc_mean'])} | "
                         f"{_fmt(s['res_0.5_mean'], 1)} | {_fmt(s['res_0.143_mean'], 1)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", default="discrete", choices=["discrete", "continuous", "compositional"])
    p.add_argument("--snr", type=float, default=0.05, help="data.particles.snr (over the whole box)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--train-box", type=int, default=32, help="data.box_size (Fourier crop)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--cryodrgn-dim", type=int, default=256, help="cryoDRGN encoder/decoder width (3 layers)")
    p.add_argument("--cryodrgn-venv", default=".cache/venvs/cryodrgn")
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every hetero run")
    p.add_argument("--workdir", default="logs/bench_accuracy")
    p.add_argument("--out", default=None, help="JSON output path")
    p.add_argument("--merge", action="store_true", help="keep rows of --out for methods not run now")
    p.add_argument("--table", nargs="+", default=None, metavar="JSON",
                   help="only print the Markdown tables of these result files")
    args = p.parse_args()
    if args.table:
        for f in args.table:
            res = json.loads(Path(f).read_text())
            print(f"\n{f}: {res['settings']}, {res.get('dataset', {})}\n")
            print(markdown(res["results"]))
            if any(r.get("reconstructed") for r in res["results"]):
                print()
                print(maps_markdown(res["results"]))
        return

    settings = {"kind": args.kind, "snr": args.snr, "epochs": args.epochs, "train_box": args.train_box,
                "zdim": 8, "extra": args.extra}
    data = [f"data.particles.kind={args.kind}", f"data.particles.snr={args.snr}", *args.extra]
    common = [
        "trainer=cpu", f"trainer.max_epochs={args.epochs}", *data,
        f"data.box_size={args.train_box}", f"model.template_size={args.train_box}",
        "data.batch_size=16", "data.num_workers=0", "data.persistent_workers=false",
        "trainer.enable_progress_bar=false", "extras.print_config=false",
    ]
    workdir = REPO / args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"{args.kind}-snr{args.snr:g}"
    previous: list[dict] = []
    if args.merge and args.out and Path(args.out).exists():
        old = json.loads(Path(args.out).read_text())
        old_settings = {**old["settings"], "snr": old["settings"].get("snr", 0.05), "zdim": 8}
        if old_settings != settings:
            raise SystemExit(f"--merge: {args.out} was made with other settings: {old['settings']}")
        previous = old["results"]
    dataset = synthetic_dataset(data)
    results = []
    for name in args.models:
        if name in HETERO:
            row = run_hetero(name, common, workdir, tag)
        elif name == "oracle":
            row = run_oracle(dataset)
        else:
            from peer_cryodrgn import ensure_venv, train_and_score

            exe = ensure_venv(REPO / args.cryodrgn_venv)
            # Other widths get their own folder, next to the default-width run.
            folder = f"{tag}-cryodrgn" + ("" if args.cryodrgn_dim == 256 else f"{args.cryodrgn_dim}")
            row = train_and_score(exe, dataset, workdir / folder, args.epochs, args.train_box,
                                  zdim=8, dim=args.cryodrgn_dim)
        row["date"] = date.today().isoformat()
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "per_state_fsc"}), flush=True)
    done = {r["model"].split(" ")[0] for r in results}
    merged = [r for r in previous if r["model"].split(" ")[0] not in done] + results
    merged.sort(key=lambda r: MODELS.index(r["model"].split(" ")[0]))
    out = {
        "command": "python " + " ".join(sys.argv),
        "date": date.today().isoformat(),
        "machine": machine(),
        "dataset": {"name": dataset.name, "n_particles": dataset.n_particles, "box_size": dataset.box_size,
                    "pixel_size_angstrom": dataset.pixel_size_angstrom, "n_states": dataset.n_states},
        "settings": settings,
        "results": merged,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print()
    print(markdown(merged))
    print()
    print(maps_markdown(merged))


if __name__ == "__main__":
    main()
