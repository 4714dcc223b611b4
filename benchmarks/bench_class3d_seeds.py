"""class3d across seeds on a built-in synthetic set: ARI per seed (and per iteration with --verbose).

EM iterations run in-process (no Trainer; ``data.val_fraction=0``: every particle classified),
the labels are the argmax classes of the final maps. ``--full``: the default synthetic molecule
(64 px, 3 Å) with 2 states, SNR 1, 400 particles (override with ``--data``); without it the
tests' tiny set (32 px, 5 Å, box 24). Prints ARI, class sizes, mean max posterior and the
degeneracy facts of :mod:`hetero.models.class3d.diagnostics` per seed. Accuracy only: the
seconds printed depend on the machine's load. Example (docs/benchmarks.md, class3d)::

    PYTHONPATH=src nice -n 10 python benchmarks/bench_class3d_seeds.py --full --data data.box_size=32 \\
        --seeds 0 1 2 3 4 5 6 7 8 9 --iters 5 --init random_subsets
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hetero.data.synthetic import load_truth  # noqa: E402
from tests.helpers import compose_train  # noqa: E402

FULL = ["data.particles.n_states=2", "data.particles.snr=1.0", "data.particles.n_particles=400",
        "data.num_workers=0", "data.persistent_workers=false"]


def parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def run_seed(cfg, dm, batches, predict_batches, truth, seed: int, a) -> float:
    start = time.time()
    overrides = dict(item.split("=", 1) for item in a.model)
    model = instantiate(cfg.model, **{**dm.info(), "seed": seed, "init": a.init, "n_iterations": a.iters,
                                      **{k: parse_value(v) for k, v in overrides.items()}})
    for it in range(a.iters):
        model.on_train_epoch_start()
        for i, b in enumerate(batches):
            model.training_step(b, i)
        model._maximize()
        if a.verbose and it:
            seen = model.assignment[:, 0].long() >= 0
            ari = adjusted_rand_score(truth[seen.numpy()], model.assignment[seen, 0].long().numpy())
            print(f"  iteration {it}: ARI {ari:.3f} prior {[round(p, 3) for p in model.prior[0].tolist()]} "
                  f"radius {int(model.radius[0])} pmax {float(model.hist_pmax[-1, 0]):.3f}")
    out = [model.predict_step(b) for b in predict_batches]
    index = torch.cat([o["index"] for o in out]).numpy()
    labels = torch.cat([o["class_number"] for o in out])
    pmax = torch.cat([o["max_prob"] for o in out])
    ari = adjusted_rand_score(truth[index], labels.numpy())
    facts = {k.split("/")[1]: round(v, 3) for k, v in model._epoch_logs.items() if k.startswith("class3d/")}
    print(f"seed {seed}: ARI {ari:.3f} sizes {torch.bincount(labels, minlength=a.k).tolist()} mean pmax "
          f"{float(pmax.mean()):.3f} {facts} ({time.time() - start:.1f} s)", flush=True)
    return ari


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--init", default="random_subsets", choices=["random_subsets", "consensus"])
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--full", action="store_true", help="default molecule (64 px, 3 Å), 2 states, SNR 1, 400 particles")
    p.add_argument("--data", nargs="*", default=[], help="train.py data overrides")
    p.add_argument("--model", nargs="*", default=[], help="Class3D keyword overrides (name=value)")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = compose_train(Path(tempfile.mkdtemp()), [*(FULL if a.full else []), "model=class3d",
                                                    f"model.n_classes={a.k}", "data.val_fraction=0",
                                                    "data.batch_size=64", *a.data], tiny_synthetic=not a.full)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    truth = load_truth(dm.truth_dir)["labels"]
    batches, predict_batches = list(dm.train_dataloader()), list(dm.predict_dataloader())
    aris = [run_seed(cfg, dm, batches, predict_batches, truth, seed, a) for seed in a.seeds]
    print(f"ARI >= 0.8 for {sum(x >= 0.8 for x in aris)}/{len(aris)} seeds; min {min(aris):.3f}, "
          f"mean {sum(aris) / len(aris):.3f}")


if __name__ == "__main__":
    main()
