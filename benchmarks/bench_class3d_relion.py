"""class3d beside RELION 3.1.3's own 3D classification without alignment, same particles.

For one built-in synthetic dataset (kind, states, SNR, particles, box) this runs, on the same
``particles.star`` (poses, origins and CTF from the simulation, as a consensus refinement would
give them):

* ``hetero``: ``train.py model=class3d`` (K classes, N iterations, T, 10 Å E-step limit, 60 Å
  initial low-pass, ``--init``: random_subsets, the default, or consensus) with the inference pass; labels = argmax class;
* ``relion``: ``relion_reconstruct --ctf`` (the consensus reference), then ``relion_refine
  --skip_align`` with the same K, N, T, ``--ini_high 60 --strict_highres_exp 10
  --particle_diameter`` (hetero's default mask), ``--flatten_solvent --zero_mask --ctf --pad 2``;
  labels = ``rlnClassNumber`` of ``run_itNNN_data.star`` (matched to the input by image name);
* ``oracle``: the physical limit of classification (:mod:`hetero.data.synthetic.oracle`).

* ``alphacryo4d`` (optional): ``train.py model=alphacryo4d`` on the same particles (voted states;
  discarded particles are labelled -1).

All are scored by the same function: ARI/AMI of their labels against the true states over the
kept particles (and as a fraction of the oracle's ARI), per-state precision and recall after a
one-to-one (Hungarian) matching of classes to states, macro-averaged (discarded particles are
misses), the paper's majority-labelled precision/recall and the discarded fraction, with wall time (``hetero`` includes start-up and the inference pass) and peak
resident memory. Writes JSON (``--out``) and prints a Markdown table for ``docs/benchmarks.md``.
RELION is optional: without ``relion_refine`` on PATH its row is skipped (logged). ``--merge``
keeps the rows (and the oracle) of ``--out`` for methods not run now; ``--rescore`` recomputes
their scores from their outputs still in ``--workdir`` (``--methods`` with no name: rescore only).

Example usage (the second: the sets of the accuracy benchmark, bench_accuracy.py, whose
OPUS-DSD / cryoDRGN / homogeneous rows are on the same particles)::

    nice -n 10 python benchmarks/bench_class3d_relion.py --n-states 4 --n-particles 2000 \\
        --box 32 --snr 0.05 --iterations 15 --threads 1 --out docs/bench_class3d_relion.json
    nice -n 10 python benchmarks/bench_class3d_relion.py --n-states 8 --n-particles 5000 --box 64 \
        --apix 3 --train-box 32 --snr 0.05 --iterations 15 --out docs/bench_class3d_relion_discrete8.json
    nice -n 10 python benchmarks/bench_class3d_relion.py --methods alphacryo4d --a4d-classes 8 --merge \
        --n-states 8 ... --workdir logs/bench_class3d_relion8 --out docs/bench_class3d_relion_discrete8.json
    # AlphaCryo4D with bootstrap unions (10 unions of 3 consecutive subsets: 80 volumes at 8 classes)
    nice -n 10 python benchmarks/bench_class3d_relion.py --methods alphacryo4d_bootstrap --a4d-classes 8 \
        --a4d-subsets 10 --a4d-window 3 --merge --n-states 8 ... --out docs/bench_class3d_relion_discrete8.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np
import starfile
from _common import machine, run_measured
from bench_accuracy import run_oracle, synthetic_dataset

REPO = Path(__file__).resolve().parents[1]


def scores(truth: np.ndarray, labels: np.ndarray) -> dict:
    """The same scores for every method: ARI/AMI over the kept particles (``labels >= 0``), class
    sizes, per-state precision and recall after a one-to-one (Hungarian) matching of classes to
    true states (discarded particles are misses), the AlphaCryo4D paper's majority-labelled
    precision and recall (:func:`hetero.analysis.classification.classification_scores`) and the
    discarded fraction."""
    from hetero.analysis.classification import classification_scores, matched_precision_recall
    from hetero.analysis.metrics import ari_ami

    kept = labels >= 0
    matched = matched_precision_recall(truth, labels)
    majority = classification_scores(truth, labels)
    return {**ari_ami(truth[kept], labels[kept]),
            "class_sizes": np.bincount(labels[kept]).tolist(),
            "discard_fraction": matched["discard_fraction"],
            "precision_matched": matched["precision_macro"], "recall_matched": matched["recall_macro"],
            "precision_per_state": matched["precision"], "recall_per_state": matched["recall"],
            "precision_majority": majority["precision_mean"], "recall_majority": majority["recall_mean"],
            "states_found_majority": majority["states_found"]}


def hetero_labels(run_dir: Path) -> np.ndarray:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return np.load(run_dir / manifest["parts"]["latents"]["path"] / "class_number.npy").astype(np.int64)


def relion_labels(out: Path, iterations: int, star: Path) -> np.ndarray:
    """``rlnClassNumber - 1`` of ``run_itNNN_data.star`` in the order of ``star`` (matched by image name)."""
    data = starfile.read(out / f"run_it{iterations:03d}_data.star")["particles"]
    names = starfile.read(star)["particles"]["rlnImageName"].tolist()
    order = {n: i for i, n in enumerate(names)}
    labels = np.full(len(names), -1, dtype=np.int64)
    labels[[order[n] for n in data["rlnImageName"]]] = data["rlnClassNumber"].to_numpy() - 1
    return labels


def alphacryo4d_labels(run_dir: Path) -> np.ndarray:
    return np.load(run_dir / "alphacryo4d" / "voting" / "labels.npy").astype(np.int64)


def run_hetero(a, data: list[str], workdir: Path, truth: np.ndarray) -> dict:
    run_dir = workdir / "hetero"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "train.py", "model=class3d", f"model.n_classes={a.k}", f"model.n_iterations={a.iterations}",
           f"model.tau2_fudge={a.tau2}", f"model.init={a.init}", f"model.particle_diameter={a.diameter:.2f}", "predict=true", "data.val_fraction=0", f"data.num_workers={a.threads - 1}",
           "logger=csv", "extras.print_config=false", *data, f"hydra.run.dir={run_dir}"]
    seconds, peak = run_measured(cmd, workdir / "hetero-train.log", cwd=REPO)
    labels = hetero_labels(run_dir)
    name = f"hetero class3d (init={a.init})"
    return {"method": name, "key": "hetero", "seconds": round(seconds, 1), "seconds_per_iteration": round(seconds / a.iterations, 2),
            "peak_rss_mb": round(peak), **scores(truth, labels)}


def run_relion(a, star: Path, diameter: float, workdir: Path, truth: np.ndarray) -> dict | None:
    if shutil.which("relion_refine") is None:
        print("relion_refine not on PATH: RELION row skipped", file=sys.stderr)
        return None
    out = workdir / "relion"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ref = out / "consensus.mrc"
    rec_s, _ = run_measured(["relion_reconstruct", "--i", star, "--o", ref, "--ctf"], out / "reconstruct.log",
                            cwd=star.parent)
    cmd = ["relion_refine", "--i", star, "--o", out / "run", "--ref", ref, "--ini_high", "60",
           "--K", a.k, "--iter", a.iterations, "--tau2_fudge", a.tau2, "--particle_diameter", f"{diameter:.2f}",
           "--flatten_solvent", "--zero_mask", "--ctf", "--skip_align", "--strict_highres_exp", "10", "--pad", "2",
           "--j", a.threads, "--pool", "30", "--dont_combine_weights_via_disc", "--random_seed", "0"]
    seconds, peak = run_measured(cmd, out / "refine.log", cwd=star.parent)
    labels = relion_labels(out, a.iterations, star)
    return {"method": "RELION 3.1.3 relion_refine --skip_align", "key": "relion", "seconds": round(seconds + rec_s, 1),
            "seconds_per_iteration": round(seconds / a.iterations, 2), "peak_rss_mb": round(peak),
            **scores(truth, labels)}


def _a4d(a, key: str) -> tuple[list[str], int, str, dict]:
    """Shuffling overrides, number of volumes, row label and settings of ``alphacryo4d``
    (leave-one-out, M = ``--a4d-fold``) or ``alphacryo4d_bootstrap`` (``--a4d-subsets`` unions of
    ``--a4d-window`` consecutive subsets: every particle in ``window`` unions)."""
    if key == "alphacryo4d_bootstrap":
        over = ["alphacryo4d.shuffling.scheme=bootstrap", f"alphacryo4d.shuffling.n_subsets={a.a4d_subsets}",
                f"alphacryo4d.shuffling.window={a.a4d_window}"]
        return (over, a.a4d_subsets * a.a4d_classes, f"bootstrap {a.a4d_subsets} x window {a.a4d_window}",
                {"scheme": "bootstrap", "n_subsets": a.a4d_subsets, "window": a.a4d_window})
    return ([f"alphacryo4d.shuffling.fold={a.a4d_fold}"], (a.a4d_fold + 1) * a.a4d_classes, f"M={a.a4d_fold}",
            {"fold": a.a4d_fold})


def run_alphacryo4d(a, data: list[str], workdir: Path, truth: np.ndarray, key: str = "alphacryo4d") -> dict:
    """``train.py model=alphacryo4d`` on the same particles: M-fold (or bootstrap) unions, each
    classified into ``--a4d-classes`` classes by class3d for ``--iterations`` EM iterations, then
    the autoencoder, t-SNE, landscape, ``n_states`` deepest minima as states and energy-based
    voting. Labels: the voted states; discarded particles (no majority) are left out of ARI/AMI
    and counted."""
    run_dir = workdir / key
    shutil.rmtree(run_dir, ignore_errors=True)
    shuffling, n_volumes, _, _ = _a4d(a, key)
    cmd = [sys.executable, "train.py", "model=alphacryo4d", *shuffling,
           f"alphacryo4d.resampling.classifier.n_classes={a.a4d_classes}",
           f"alphacryo4d.resampling.classifier.n_iterations={a.iterations}",
           f"+alphacryo4d.resampling.classifier.tau2_fudge={a.tau2}",
           f"+alphacryo4d.resampling.classifier.particle_diameter={a.diameter:.2f}",
           f"alphacryo4d.manifold.tsne.perplexity={min(30, max(2, (n_volumes - 1) // 3))}",
           "alphacryo4d.path.states=minima", f"alphacryo4d.path.k={a.n_states}",
           f"data.num_workers={a.threads - 1}", "logger=csv", "extras.print_config=false", *data,
           f"hydra.run.dir={run_dir}"]
    seconds, peak = run_measured(cmd, workdir / f"{key}-train.log", cwd=REPO)
    return alphacryo4d_row(a, run_dir, seconds, peak, truth, key)


def alphacryo4d_row(a, run_dir: Path, seconds: float, peak: float, truth: np.ndarray,
                    key: str = "alphacryo4d") -> dict:
    """The AlphaCryo4D row from a finished run: voted labels, stage times, the string's settling."""
    _, n_volumes, label, settings = _a4d(a, key)
    labels = alphacryo4d_labels(run_dir)
    kept = labels >= 0
    pipeline = json.loads((run_dir / "alphacryo4d" / "pipeline.json").read_text())
    stages = {name: round(float(rec.get("seconds", 0.0)), 1) for name, rec in pipeline.items()}
    path = {k: v for k, v in pipeline.get("path", {}).get("summary", {}).items() if k != "state_centers"}
    row = {"method": f"hetero alphacryo4d ({label}, {n_volumes} volumes, voted states)", "key": key,
           "seconds": round(seconds, 1), "seconds_per_iteration": round(stages.get("resampling", seconds) / a.iterations, 2),
           "peak_rss_mb": round(peak), **scores(truth, labels),
           "labelled_fraction": float(kept.mean()), "stage_seconds": stages, "path": path,
           "settings": {**settings, "classes_per_union": a.a4d_classes, "iterations": a.iterations}}
    return row


def scored_alphacryo4d_run(a, run_dir: Path, truth: np.ndarray) -> dict:
    """The row of a finished AlphaCryo4D run (``--score-a4d-run``): its voted labels scored, its
    shuffling, classes and landscape settings read from its own config; wall time = the sum of
    its stages' recorded times."""
    from omegaconf import OmegaConf

    c = OmegaConf.load(run_dir / ".hydra" / "config.yaml").alphacryo4d
    sh = c.shuffling
    a4d = argparse.Namespace(**{**vars(a), "a4d_fold": sh.fold, "a4d_subsets": sh.n_subsets, "a4d_window": sh.window,
                                "a4d_classes": c.resampling.classifier.n_classes,
                                "iterations": c.resampling.classifier.n_iterations})
    kind = "alphacryo4d_bootstrap" if sh.scheme == "bootstrap" else "alphacryo4d"
    row = alphacryo4d_row(a4d, run_dir, 0.0, 0.0, truth, kind)
    row.update(seconds=round(sum(row["stage_seconds"].values()), 1), peak_rss_mb="-")
    energy = c.landscape.get("energy", "counts")
    row.update(key=a.a4d_key, run_dir=str(run_dir), landscape_energy=energy,
               method=row["method"].replace("voted states)", f"landscape={energy}, voted states)"))
    return row


def _f(v, d: int = 3) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def markdown(rows: list[dict], oracle: dict) -> str:
    lines = ["| method | ARI (kept) | ARI / oracle | AMI | precision | recall | discarded | class sizes | wall (s) | "
             "s / iteration | peak RSS (MB) |", "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        frac = r["ari"] / oracle["ari"] if oracle["ari"] > 0 else float("nan")
        lines.append(f"| {r['method']} | {r['ari']:.3f} | {frac:.2f} | {r['ami']:.3f} | {_f(r.get('precision_matched'))} | "
                     f"{_f(r.get('recall_matched'))} | {_f(r.get('discard_fraction'), 2)} | {r['class_sizes']} | "
                     f"{r['seconds']:.0f} | {r['seconds_per_iteration']:.2f} | {r['peak_rss_mb']} |")
    lines.append(f"| oracle | {oracle['ari']:.3f} | 1.00 | {oracle['ami']:.3f} | | | | | {oracle['seconds']:.0f} | | |")
    return "\n".join(lines)


def row_key(row: dict) -> str:
    """``hetero`` / ``relion`` / ``alphacryo4d[_bootstrap]`` (rows written before the key existed: by name)."""
    if "key" in row:
        return row["key"]
    return "relion" if row["method"].startswith("RELION") else row["method"].split()[1].replace("class3d", "hetero")


def rescore(rows: list[dict], a, star: Path, truth: np.ndarray) -> None:
    """Recompute the scores of ``rows`` (kept from ``--out``) from their runs' outputs in ``--workdir``
    (no rerun); the recomputed ARI must equal the stored one (same particles, same labels)."""
    for row in rows:
        key = row_key(row)
        if "run_dir" in row:  # a --score-a4d-run row: its run may have been rerun with other settings since
            print(f"--rescore: {row['method']} kept as recorded (scored from {row['run_dir']})", file=sys.stderr)
            continue
        if key == "hetero":
            labels = hetero_labels(a.workdir / "hetero")
        elif key == "relion":
            labels = relion_labels(a.workdir / "relion", a.iterations, star)
        else:
            labels = alphacryo4d_labels(a.workdir / key)
        new = scores(truth, labels)
        if abs(new["ari"] - row["ari"]) > 1e-9:
            raise SystemExit(f"--rescore: {row['method']}: ARI {new['ari']} from {a.workdir} != stored {row['ari']}")
        row.update(new, key=key)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="discrete")
    p.add_argument("--n-states", type=int, default=4)
    p.add_argument("--n-particles", type=int, default=2000)
    p.add_argument("--box", type=int, default=32)
    p.add_argument("--apix", type=float, default=6.0)
    p.add_argument("--train-box", type=int, default=None,
                   help="hetero's data.box_size (Fourier crop; default --box); RELION classifies at --box")
    p.add_argument("--snr", type=float, default=0.05)
    p.add_argument("--k", type=int, default=None, help="classes (default: the number of states)")
    p.add_argument("--iterations", type=int, default=15)
    p.add_argument("--tau2", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--init", default="random_subsets", choices=["consensus", "random_subsets"],
                   help="hetero's model.init (random_subsets: RELION's random seeds from one --ref)")
    p.add_argument("--methods", nargs="*", default=["hetero", "relion"],
                   choices=["hetero", "relion", "alphacryo4d", "alphacryo4d_bootstrap"])
    p.add_argument("--a4d-fold", type=int, default=3, help="AlphaCryo4D: M (every particle in M unions)")
    p.add_argument("--a4d-subsets", type=int, default=10, help="alphacryo4d_bootstrap: n subsets (= unions)")
    p.add_argument("--a4d-window", type=int, default=3, help="alphacryo4d_bootstrap: window (every particle in it)")
    p.add_argument("--a4d-classes", type=int, default=6, help="AlphaCryo4D: classes per union")
    p.add_argument("--score-a4d-run", type=Path, default=None,
                   help="score this finished AlphaCryo4D run directory (e.g. one rerun from its landscape stage "
                        "with other settings) as the row --a4d-key, instead of running anything")
    p.add_argument("--a4d-key", default="alphacryo4d_rescored", help="row key of --score-a4d-run")
    p.add_argument("--workdir", type=Path, default=REPO / "logs" / "bench_class3d_relion")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of --out for methods not run now, and its oracle (same dataset only)")
    p.add_argument("--rescore", action="store_true",
                   help="with --merge: recompute the kept rows' scores from their outputs in --workdir")
    a = p.parse_args()
    a.k = a.k or a.n_states
    a.workdir = a.workdir.resolve()  # RELION runs in the star file's folder
    data = [f"data.particles.kind={a.kind}", f"data.particles.n_states={a.n_states}",
            f"data.particles.n_particles={a.n_particles}", f"data.particles.box_size={a.box}",
            f"data.particles.pixel_size_angstrom={a.apix}", f"data.particles.snr={a.snr}",
            f"data.box_size={a.train_box or a.box}"]
    ds = synthetic_dataset(data)
    star = Path(ds.ensure())
    from hetero.data.synthetic import load_truth

    truth = np.asarray(load_truth(ds.truth_dir)["labels"])
    a.workdir.mkdir(parents=True, exist_ok=True)
    dataset = {"name": ds.name, "kind": a.kind, "n_states": a.n_states, "n_particles": a.n_particles, "box": a.box,
               "apix": a.apix, "snr": a.snr, "train_box": a.train_box or a.box}
    previous, oracle = [], None
    if a.merge and a.out and a.out.exists():
        old = json.loads(a.out.read_text())
        if {"name": ds.name, **old["dataset"]} != dataset:
            raise SystemExit(f"--merge: {a.out} holds another dataset: {old['dataset']}")
        # every row keeps its own EM iterations (a method rerun with fewer says so in its row)
        replaced = set(a.methods) | ({a.a4d_key} if a.score_a4d_run else set())
        previous = [{"date": old["date"], "command": old["command"], "iterations": old["settings"]["iterations"], **r}
                    for r in old["rows"] if row_key(r) not in replaced]
        if a.rescore and any(r["iterations"] != a.iterations for r in previous):
            raise SystemExit("--rescore: give the kept rows' --iterations (RELION's data star of that iteration)")
        oracle = old["oracle"]
        if a.rescore:
            rescore(previous, a, star, truth)
    # class3d's default particle_diameter at the particles' box, given to both
    diameter = a.diameter = (a.box - 5.0) * a.apix
    rows = []
    if "hetero" in a.methods:
        rows.append(run_hetero(a, data, a.workdir, truth))
    if "relion" in a.methods:
        row = run_relion(a, star, diameter, a.workdir, truth)
        if row:
            rows.append(row)
    for key in ("alphacryo4d", "alphacryo4d_bootstrap"):
        if key in a.methods:
            rows.append(run_alphacryo4d(a, data, a.workdir, truth, key))
    if a.score_a4d_run:
        rows.append(scored_alphacryo4d_run(a, a.score_a4d_run, truth))
    stamp = {"date": date.today().isoformat(), "command": " ".join(sys.argv), "load_average": list(os.getloadavg()),
             "iterations": a.iterations}
    rows = [{**stamp, **r} for r in rows]
    order = ["hetero", "relion", "alphacryo4d", "alphacryo4d_bootstrap"]
    rows = sorted(previous + rows, key=lambda r: order.index(row_key(r)) if row_key(r) in order else len(order))
    oracle = oracle or run_oracle(ds)
    table = markdown(rows, oracle)
    print(table)
    if a.out:
        result = {"date": date.today().isoformat(), "machine": machine(), "command": " ".join(sys.argv),
                  "load_average": list(os.getloadavg()),
                  "dataset": dataset,
                  "settings": {"K": a.k, "init": a.init, "iterations": a.iterations, "tau2_fudge": a.tau2, "threads": a.threads},
                  "rows": rows, "oracle": oracle, "markdown": table}
        a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as err:
        sys.exit(f"{err.cmd[0]} failed ({err.returncode}): {err.output}")
