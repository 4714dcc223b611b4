"""Does DynaMight learn the hinge at low SNR? Short training runs scored by latent recovery.

Trains ``model=dynamight_cpu`` on the built-in continuous hinge (default SNR 0.05, box 64 at
3 Å/px Fourier-cropped to 32, like ``bench_accuracy.py``) through the training task, once per
seed and per variant (a set of Hydra overrides), and scores each half set like
``tests/models/test_dynamight_recovery.py``: ``|Spearman|`` of the first principal component of
that half's own ``z_mu`` (its own particles, validation ones included) with the true hinge
parameter ``t``; the same for ``t`` predicted linearly from ``z_mu`` (5-fold cross-validated:
is the hinge in the latents at all, along any direction); plus the KL per particle (nats, own half's encoder) and the mean deformation
RMSD (Å) at the end. Used for the "Diagnosis of the collapse" table in docs/benchmarks.md::

    python benchmarks/bench_dynamight_collapse.py --seeds 0 1 --epochs 12 \
        --variant base= --variant flip=model.encoder_phase_flip=true \
        --out logs/dynamight_collapse.json

``--variant NAME=OVERRIDE[,OVERRIDE...]`` (an empty list: the defaults); ``--extra`` overrides
apply to every run. Results are appended to ``--out`` (a JSON list), one record per run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime
from pathlib import Path

import numpy as np
import torch
from _common import machine
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]
BASE = [
    "trainer=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "++callbacks.progress_bar=null",
    "extras.print_config=false",
    "predict=false",
    "model=dynamight_cpu",
    "model.zdim=8",
    "data.particles.kind=continuous",
    "data.num_workers=0",
    "data.persistent_workers=false",
    "data.val_fraction=0.05",
]


def compose(out_dir: Path, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        cfg.paths.work_dir = str(REPO)
    return cfg


def _pc1(z: np.ndarray) -> np.ndarray:
    zc = z - z.mean(0)
    return zc @ np.linalg.svd(zc, full_matrices=False)[2][0]


@torch.no_grad()
def score(model, dm) -> dict:
    """Per half set: |Spearman(PC1 of own z_mu, t)|, KL per particle, mean deformation RMSD."""
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import cross_val_predict

    from hetero.analysis.inference import predict_particles
    from hetero.data.synthetic import load_truth

    a = predict_particles(model, dm.predict_dataloader(), progress=False)  # input order
    t = np.asarray(load_truth(dm.truth_dir)["t"]).reshape(len(a["half"]), -1)[:, 0]
    res = {}
    for h in (0, 1):
        own = np.flatnonzero(a["half"] == h)
        mu = a[f"z_mu_half{h + 1}"][own]
        logstd = a["z_logstd"][own]
        kl = 0.5 * (mu**2 + np.exp(2 * logstd) - 1 - 2 * logstd).sum(1)
        res[f"spearman_half{h + 1}"] = float(abs(spearmanr(_pc1(mu), t[own])[0]))
        # Is the hinge in z at all (not necessarily along PC1)? t predicted linearly from z,
        # 5-fold cross-validated.
        pred = cross_val_predict(LinearRegression(), mu, t[own], cv=5)
        res[f"linear_spearman_half{h + 1}"] = float(abs(spearmanr(pred, t[own])[0]))
        res[f"kl_half{h + 1}"] = float(kl.mean())
        res[f"z_std_half{h + 1}"] = float(mu.std(0).mean())
        res[f"rmsd_half{h + 1}"] = float(a["deformation_rmsd"][own].mean())
    return res


def kl_by_epoch(metrics_csv: Path) -> dict:
    """Mean logged ``train/kl_half{1,2}`` of every epoch (the collapse's trajectory)."""
    import pandas as pd

    if not metrics_csv.is_file():
        return {}
    df = pd.read_csv(metrics_csv)
    out = {}
    for h in (1, 2):
        col = f"train/kl_half{h}"
        if col in df:
            per = df.dropna(subset=[col]).groupby("epoch")[col].mean()
            out[f"kl_epochs_half{h}"] = [round(float(v), 4) for v in per.to_numpy()]
    return out


def run_one(overrides: list[str], seed: int) -> dict:
    from hetero.tasks.train import train

    with tempfile.TemporaryDirectory(prefix="dyncollapse") as tmp:
        cfg = compose(Path(tmp), [*overrides, f"seed={seed}"])
        start = time.perf_counter()
        _, objects = train(cfg)
        wall = time.perf_counter() - start
        res = score(objects["model"], objects["datamodule"])
        res.update(kl_by_epoch(Path(tmp) / "logs" / "csv" / "metrics.csv"))
    lam = objects["model"].state_dict().get("reg_weight")
    res["train_s"] = round(wall, 1)
    if lam is not None:
        res["lambda"] = [float(x) for x in lam.flatten()]
    return res


def oracle(overrides: list[str]) -> dict:
    """The maximum-likelihood hinge parameter of every particle given the true maps, poses and
    CTF (``hetero.data.synthetic.oracle``, at the full box): the bound for any latent."""
    from hydra.utils import instantiate

    from hetero.data.synthetic import load_truth
    from hetero.data.synthetic.oracle import oracle_assignment

    with tempfile.TemporaryDirectory(prefix="dyncollapse") as tmp:
        cfg = compose(Path(tmp), overrides)
        dataset = instantiate(cfg.data.particles)
    res = oracle_assignment(dataset)
    t = np.asarray(load_truth(dataset.truth_dir)["t"]).reshape(dataset.n_particles, -1)[:, 0]
    return {"variant": "oracle", "spearman": float(abs(spearmanr(res["t"], t)[0])),
            "t_pearson": float(res["t_pearson"]), "t_rmse": float(res["t_rmse"]), "ari": float(res["ari"])}


def table(records: list[dict]) -> str:
    """Markdown: one row per (variant, epochs), every seed's half-set scores listed."""
    rows: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("variant") != "oracle":
            rows.setdefault((r["variant"], r["epochs"]), []).append(r)
    lines = ["| variant | overrides | epochs | seeds | Spearman half 1 / 2 per seed | mean | mean of "
             "the lower half | KL half 1 / 2 per seed | both >= 0.5 |",
             "|---|---|---:|---:|---|---:|---:|---|---:|"]
    for (name, epochs), rs in rows.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        sp = "; ".join(f"{r['spearman_half1']:.2f} / {r['spearman_half2']:.2f}" for r in rs)
        kl = "; ".join(f"{r['kl_half1']:.2g} / {r['kl_half2']:.2g}" for r in rs)
        low = np.mean([min(r["spearman_half1"], r["spearman_half2"]) for r in rs])
        mean = np.mean([[r["spearman_half1"], r["spearman_half2"]] for r in rs])
        ok = sum(min(r["spearman_half1"], r["spearman_half2"]) >= 0.5 for r in rs)
        ov = ", ".join(f"`{o}`" for o in rs[0]["overrides"]) or "(defaults)"
        lines.append(f"| {name} | {ov} | {epochs} | {', '.join(str(r['seed']) for r in rs)} | {sp} | "
                     f"{mean:.2f} | {low:.2f} | {kl} | {ok} of {len(rs)} |")
    return "\n".join(lines)


def swap_half_sets() -> None:
    """Diagnostic: every particle goes to the other half set (the data module's assignment,
    ``1 - h``), so half-set slot 1 trains on what slot 2 did and vice versa; network and
    consensus seeding stay with the slot."""
    from hetero.data.datamodule import ParticleDataModule

    assign = ParticleDataModule._make_half_sets

    def swapped(self, table):
        halves, source = assign(self, table)
        return (1 - np.asarray(halves)).astype(np.int8), source

    ParticleDataModule._make_half_sets = swapped


def swap_initial_states() -> None:
    """Diagnostic: the two half-set VAEs exchange their networks' initial weights and their
    consensus seeding draws (``model.init_seed``'s generator seeds slot 2 first); each consensus
    is still fitted to its own half set's map. With ``--swap-halves`` a run is the mirror image
    of the unswapped one: slot 1 starts exactly as slot 2 did there, on the same particles; only
    the processing order (and the sampling noise drawn in it) stays with the slot."""
    import hetero.models.dynamight.initialization as init
    import hetero.models.dynamight.module as module

    initialize, maps = module.initialize_consensus, init.half_set_maps

    def reversed_maps(*args, **kwargs):
        volumes, used = maps(*args, **kwargs)
        return volumes[::-1], used[::-1]

    def swapped(m):
        first, second = (dict((k, v.clone()) for k, v in vae.state_dict().items()) for vae in m.halves)
        m.halves[0].load_state_dict(second)
        m.halves[1].load_state_dict(first)
        slots = m.halves._modules
        slots["0"], slots["1"] = slots["1"], slots["0"]  # seeded in reverse order, with their own maps
        init.half_set_maps = reversed_maps
        try:
            initialize(m)
        finally:
            slots["0"], slots["1"] = slots["1"], slots["0"]
            init.half_set_maps = maps

    module.initialize_consensus = swapped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", default=None, metavar="NAME=OVERRIDES",
                   help="a named set of comma-separated Hydra overrides (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--particles", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--snr", type=float, default=0.05)
    p.add_argument("--box", type=int, default=64, help="image box of the synthetic set (3 Å/px)")
    p.add_argument("--train-box", type=int, default=32, help="data.box_size (Fourier crop)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--extra", nargs="*", default=[], help="Hydra overrides for every run")
    p.add_argument("--out", default=None, help="JSON list the records are appended to")
    p.add_argument("--oracle", action="store_true", help="score the maximum-likelihood oracle instead")
    p.add_argument("--table", default=None, metavar="JSON", help="only print the Markdown table of a result file")
    p.add_argument("--swap-halves", action="store_true",
                   help="exchange the two half sets (does an outcome follow the particles or the slot?)")
    p.add_argument("--swap-init", action="store_true",
                   help="exchange the two VAEs' initial network weights and consensus seeding draws")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    torch.set_num_threads(args.threads)
    variants = {}
    for spec in args.variant or ["base="]:
        name, _, ov = spec.partition("=")
        variants[name] = [o for o in ov.split(",") if o]
    common = [
        *BASE, f"data.particles.n_particles={args.particles}", f"data.particles.snr={args.snr}",
        f"data.particles.box_size={args.box}", f"data.box_size={args.train_box}",
        f"model.template_size={args.train_box}", f"data.batch_size={args.batch}",
        f"trainer.max_epochs={args.epochs}", *args.extra,
    ]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    if args.oracle:
        print("RESULT " + json.dumps({**oracle(common), "particles": args.particles, "snr": args.snr}))
        return
    if args.swap_halves:
        swap_half_sets()
    if args.swap_init:
        swap_initial_states()
    for name, ov in variants.items():
        for seed in args.seeds:
            res = run_one([*common, *ov], seed)
            rec = {"variant": name, "overrides": ov, "seed": seed, "particles": args.particles,
                   "epochs": args.epochs, "batch": args.batch, "snr": args.snr, **res,
                   "date": str(date.today()), "finished": datetime.now().strftime("%H:%M"),
                   "commit": commit, "extra": args.extra, "swap_halves": args.swap_halves,
                   "swap_init": args.swap_init,
                   "load": Path("/proc/loadavg").read_text().split()[:3]}
            print("RESULT " + json.dumps(rec), flush=True)
            if args.out:
                out = Path(args.out)
                runs = json.loads(out.read_text()) if out.is_file() else []
                if not runs:
                    rec["machine"] = machine()
                out.write_text(json.dumps([*runs, rec], indent=1) + "\n")
    print(" ".join(sys.argv))


if __name__ == "__main__":
    main()
