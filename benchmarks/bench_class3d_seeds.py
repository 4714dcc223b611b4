"""class3d across seeds on a built-in synthetic set: ARI per seed (and per iteration with --verbose).

EM iterations are run in-process (no Trainer, no validation split: data.val_fraction=0), the
labels are the argmax classes of the final maps. ``--full``: the default synthetic molecule
(64 px, 3 Å) with 2 states, SNR 1, 400 particles (override with --data); without it the tests'
tiny set (32 px, 5 Å). Prints ARI, class sizes, mean max posterior and the degeneracy facts of
:mod:`hetero.models.class3d.diagnostics` per seed. Example (docs/benchmarks.md, class3d)::

    PYTHONPATH=src nice -n 10 python benchmarks/bench_class3d_seeds.py --full --data data.box_size=32 \
        --seeds 0 1 2 3 4 5 6 7 8 9 --iters 5 --init random_subsets
"""
import sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import torch
from hydra.utils import instantiate
from sklearn.metrics import adjusted_rand_score
from hetero.data.synthetic import load_truth
from tests.helpers import compose_train
from pathlib import Path
torch.set_num_threads(1)
import argparse
p = argparse.ArgumentParser()
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
p.add_argument("--iters", type=int, default=5)
p.add_argument("--init", default="consensus")
p.add_argument("--k", type=int, default=2)
p.add_argument("--data", nargs="*", default=[])
p.add_argument("--model", nargs="*", default=[])
p.add_argument("--verbose", action="store_true")
p.add_argument("--full", action="store_true", help="default synthetic (box 64, 3 A), 2 states SNR 1, 400 particles")
a = p.parse_args()
full = ["data.particles.n_states=2", "data.particles.snr=1.0", "data.particles.n_particles=400", "data.num_workers=0", "data.persistent_workers=false"] if a.full else []
cfg = compose_train(Path(__import__("tempfile").mkdtemp()), [*full, "model=class3d", f"model.n_classes={a.k}", "data.val_fraction=0",
                                           "data.batch_size=64", *a.data], tiny_synthetic=not a.full)
dm = instantiate(cfg.data); dm.prepare_data(); dm.setup("fit")
batches = list(dm.train_dataloader())
pbatches = list(dm.predict_dataloader())
truth_all = load_truth(dm.truth_dir)["labels"]
kw = {}
for s in a.model:
    k, v = s.split("=")
    try: v = float(v) if "." in v else int(v)
    except ValueError: pass
    kw[k] = v
aris = []
for seed in a.seeds:
    t = time.time()
    model = instantiate(cfg.model, **{**dm.info(), "seed": seed, "init": a.init, **kw})
    for it in range(a.iters):
        model.on_train_epoch_start()
        for i, b in enumerate(batches):
            model.training_step(b, i)
        model._maximize()
        if a.verbose:
            asg = model.assignment[:, 0].long()
            ok = asg >= 0
            ari_it = adjusted_rand_score(truth_all[ok.numpy()], asg[ok].numpy()) if it else float("nan")
            sel = [1, 3, 6, 10, 15, 20]
            s2 = model.sigma2[0]
            print("     sigma2/s2[20]", [round(float(s2[i] / s2[20]), 2) for i in sel], "dvp", [[round(float(model.data_vs_prior[0, k, i]), 2) for i in sel] for k in range(a.k)])
            print(f"  it {it} ari {ari_it:.3f} prior {model.prior[0].tolist()} radius {int(model.radius[0])} pmax {float(model.hist_pmax[-1,0]):.3f}")
    out = [model.predict_step(b) for b in pbatches]
    idx = torch.cat([o["index"] for o in out]); cls = torch.cat([o["class_number"] for o in out])
    pm = torch.cat([o["max_prob"] for o in out])
    ari = adjusted_rand_score(truth_all[idx.numpy()], cls.numpy())
    aris.append(ari)
    fl = {k.split("/")[1]: round(v, 3) for k, v in model._epoch_logs.items() if k.startswith("class3d/")}
    print(f"seed {seed}: {fl} ARI {ari:.3f} sizes {torch.bincount(cls, minlength=a.k).tolist()} mean pmax {float(pm.mean()):.3f} ({time.time()-t:.1f}s)", flush=True)
print("min ARI", min(aris), "mean", sum(aris)/len(aris))
