"""RELION 3.1.3 ``relion_refine --skip_align`` on a built-in synthetic set for several
``--random_seed`` values: ARI against the true states after every iteration.

Same settings as ``bench_class3d_relion.py`` (consensus from ``relion_reconstruct --ctf``,
``--ini_high 60 --tau2_fudge 4 --strict_highres_exp 10 --flatten_solvent --zero_mask --pad 2``,
particle diameter (box - 5) x apix, K = number of states). Needs ``relion_refine`` on PATH.
Example (docs/benchmarks.md, class3d)::

    PYTHONPATH=src nice -n 10 python benchmarks/bench_class3d_relion_seeds.py --iterations 12 --seeds 0 1 2 3 4 5 6 7
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import numpy as np
import starfile
from bench_accuracy import synthetic_dataset
from sklearn.metrics import adjusted_rand_score


def run_seed(a, star: Path, ref: Path, out: Path, seed: int, truth: np.ndarray, order: dict) -> float:
    o = out / f"seed{seed}"
    shutil.rmtree(o, ignore_errors=True)
    o.mkdir()
    diameter = (a.box - 5.0) * a.apix
    cmd = ["relion_refine", "--i", star, "--o", o / "run", "--ref", ref, "--ini_high", "60", "--K", a.n_states,
           "--iter", a.iterations, "--tau2_fudge", "4", "--particle_diameter", f"{diameter:.2f}", "--flatten_solvent",
           "--zero_mask", "--ctf", "--skip_align", "--strict_highres_exp", "10", "--pad", "2", "--j", "1", "--pool", "30",
           "--dont_combine_weights_via_disc", "--random_seed", seed]
    subprocess.run([str(c) for c in cmd], cwd=star.parent, check=True, capture_output=True)
    per_iteration = []
    for it in range(1, a.iterations + 1):
        data = starfile.read(o / f"run_it{it:03d}_data.star")["particles"]
        labels = np.full(len(order), -1)
        labels[[order[n] for n in data["rlnImageName"]]] = data["rlnClassNumber"].to_numpy() - 1
        per_iteration.append(round(adjusted_rand_score(truth, labels), 3))
    pmax = float(data["rlnMaxValueProbDistribution"].mean())
    print(f"seed {seed}: ARI per iteration {per_iteration} sizes {np.bincount(labels).tolist()} "
          f"mean pmax {pmax:.3f}", flush=True)
    return per_iteration[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-states", type=int, default=2)
    p.add_argument("--n-particles", type=int, default=400)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--apix", type=float, default=3.0)
    p.add_argument("--snr", type=float, default=1.0)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/relion_seeds"))
    a = p.parse_args()
    data = [f"data.particles.n_states={a.n_states}", f"data.particles.n_particles={a.n_particles}",
            f"data.particles.box_size={a.box}", f"data.particles.pixel_size_angstrom={a.apix}",
            f"data.particles.snr={a.snr}"]
    ds = synthetic_dataset(data)
    star = Path(ds.ensure())
    from hetero.data.synthetic import load_truth

    truth = np.asarray(load_truth(ds.truth_dir)["labels"])
    out = a.workdir / f"s{a.n_states}_{a.snr}_{a.box}"
    out.mkdir(parents=True, exist_ok=True)
    ref = out / "consensus.mrc"
    if not ref.exists():
        subprocess.run(["relion_reconstruct", "--i", str(star), "--o", str(ref), "--ctf"], cwd=star.parent,
                       check=True, capture_output=True)
    names = starfile.read(star)["particles"]["rlnImageName"].tolist()
    order = {n: i for i, n in enumerate(names)}
    aris = [run_seed(a, star, ref, out, seed, truth, order) for seed in a.seeds]
    print(f"RELION: ARI >= 0.8 for {sum(x >= 0.8 for x in aris)}/{len(aris)} seeds; min {min(aris):.3f}")


if __name__ == "__main__":
    main()
