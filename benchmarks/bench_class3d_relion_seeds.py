"""RELION 3.1.3 ``relion_refine --skip_align`` on a built-in synthetic set for several
``--random_seed`` values: ARI against the true states after every iteration.

Same settings as ``bench_class3d_relion.py`` (consensus from ``relion_reconstruct --ctf``,
``--ini_high 60 --tau2_fudge 4 --strict_highres_exp 10 --flatten_solvent --zero_mask --pad 2``,
default particle diameter (box - 5) x apix). Needs ``relion_refine`` on PATH. Example::

    PYTHONPATH=src nice -n 10 python benchmarks/bench_class3d_relion_seeds.py --iterations 12 --seeds 0 1 2 3 4 5 6 7
"""
import argparse, shutil, subprocess, sys
from pathlib import Path
import numpy as np, starfile
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy import synthetic_dataset
from sklearn.metrics import adjusted_rand_score
p = argparse.ArgumentParser()
p.add_argument("--n-states", type=int, default=2); p.add_argument("--n-particles", type=int, default=400)
p.add_argument("--box", type=int, default=64); p.add_argument("--apix", type=float, default=3.0)
p.add_argument("--snr", type=float, default=1.0); p.add_argument("--iterations", type=int, default=5)
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4]); p.add_argument("--extra", default="")
a = p.parse_args()
data = [f"data.particles.n_states={a.n_states}", f"data.particles.n_particles={a.n_particles}",
        f"data.particles.box_size={a.box}", f"data.particles.pixel_size_angstrom={a.apix}", f"data.particles.snr={a.snr}"]
ds = synthetic_dataset(data); star = Path(ds.ensure())
from hetero.data.synthetic import load_truth
truth = np.asarray(load_truth(ds.truth_dir)["labels"])
out = Path(f"/tmp/relion_seeds/s{a.n_states}_{a.snr}_{a.box}"); out.mkdir(parents=True, exist_ok=True)
ref = out / "consensus.mrc"
if not ref.exists():
    subprocess.run(["relion_reconstruct", "--i", str(star), "--o", str(ref), "--ctf"], cwd=star.parent, check=True, capture_output=True)
diameter = (a.box - 5.0) * a.apix
names = starfile.read(star)["particles"]["rlnImageName"].tolist(); order = {n: i for i, n in enumerate(names)}
aris = []
for seed in a.seeds:
    o = out / f"seed{seed}"; shutil.rmtree(o, ignore_errors=True); o.mkdir()
    cmd = ["relion_refine", "--i", str(star), "--o", str(o / "run"), "--ref", str(ref), "--ini_high", "60", "--K", str(a.n_states),
           "--iter", str(a.iterations), "--tau2_fudge", "4", "--particle_diameter", f"{diameter:.2f}", "--flatten_solvent", "--zero_mask",
           "--ctf", "--skip_align", "--strict_highres_exp", "10", "--pad", "2", "--j", "1", "--pool", "30",
           "--dont_combine_weights_via_disc", "--random_seed", str(seed), *a.extra.split()]
    subprocess.run(cmd, cwd=star.parent, check=True, capture_output=True)
    per_it = []
    for it in range(1, a.iterations + 1):
        d = starfile.read(o / f"run_it{it:03d}_data.star")["particles"]
        lab = np.full(len(names), -1); lab[[order[n] for n in d["rlnImageName"]]] = d["rlnClassNumber"].to_numpy() - 1
        per_it.append(round(adjusted_rand_score(truth, lab), 3))
    pm = float(d["rlnMaxValueProbDistribution"].mean())
    aris.append(per_it[-1])
    print(f"seed {seed}: ARI per iteration {per_it} sizes {np.bincount(lab).tolist()} mean pmax {pm:.3f}", flush=True)
print("RELION min", min(aris), "mean", np.mean(aris))
