"""cryoDRGN as a peer in the accuracy benchmark: install, train, decode, score like hetero.

cryoDRGN (PyPI ``cryodrgn``) goes into its own virtual environment (it pins its own numpy and
torch), made on first use. It is fed the *same* particles, poses and CTF as hetero through its
own tools and formats, the way a user would run it on a RELION refinement::

    cryodrgn downsample particles.mrcs -D <train box> -o particles.<box>.mrcs   # Fourier crop
    cryodrgn parse_pose_star particles.star -D <box> -o pose.pkl
    cryodrgn parse_ctf_star  particles.star -D <box> --Apix <apix> -o ctf.pkl
    cryodrgn train_vae particles.<box>.mrcs --poses pose.pkl --ctf ctf.pkl --zdim 8 -n <epochs>
    cryodrgn eval_vol weights.pkl -c config.yaml --zfile z.txt --Apix <train apix>

Its latent ``z.pkl`` is read with hetero's restricted unpickler and scored with the functions
``analyze.py`` uses (:mod:`hetero.analysis.metrics`): k-means ARI/AMI with k = true states,
maps decoded at the particle nearest each state's mean latent, resampled to the original grid
and compared with the true volumes (FSC AUC, FSC=0.5), the CryoBench per-image FSC on the same
evenly spaced images, and the neighbourhood similarity on the continuous set.

The defaults of ``cryodrgn train_vae`` are kept (data sign inversion, real-space window,
beta = 1/zdim, batch 8, lr 1e-4, mixed precision where available) except the network width:
``--enc-dim/--dec-dim`` 256 with 3 layers, cryoDRGN's own recommendation for fast first
passes (its 1024 x 3 default is ~4x slower per image on 2 CPU cores; pass ``dim=1024`` to use it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import run_measured

CRYODRGN_VERSION = "4.3.1"


def ensure_venv(venv: Path) -> Path:
    """The ``cryodrgn`` executable in ``venv``, creating the environment first if needed."""
    exe = venv / "bin" / "cryodrgn"
    if exe.exists():
        return exe
    print(f"installing cryodrgn=={CRYODRGN_VERSION} into {venv} (a few minutes, once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    if not shutil.which("nvidia-smi"):
        # A CPU build of torch where there is no GPU (as scripts/setup.sh does for hetero).
        ok = subprocess.run(pip + ["torch==2.13.0"], check=False).returncode == 0
        if not ok:
            subprocess.run(pip + ["torch", "--index-url", "https://download.pytorch.org/whl/cpu"], check=False)
    subprocess.run(pip + [f"cryodrgn=={CRYODRGN_VERSION}"], check=True)
    return exe


def _decode(exe: Path, work: Path, z: np.ndarray, apix: float, tag: str) -> np.ndarray:
    """Maps ``(len(z), d, d, d)`` decoded by ``cryodrgn eval_vol`` at latent points ``z``."""
    from hetero.data.io.mrc import read_volume

    out = work / f"vols_{tag}"
    shutil.rmtree(out, ignore_errors=True)
    np.savetxt(work / f"z_{tag}.txt", z)
    run_measured([exe, "eval_vol", work / "train" / "weights.pkl", "-c", work / "train" / "config.yaml",
                  "--zfile", work / f"z_{tag}.txt", "-o", out, "--Apix", f"{apix}"], work / f"eval_{tag}.log")
    files = sorted(out.glob("*.mrc"))
    if len(files) != len(z):
        raise RuntimeError(f"cryodrgn eval_vol wrote {len(files)} maps into {out}, expected {len(z)}")
    return np.stack([read_volume(f)[0] for f in files]).astype(np.float32)


def train_and_score(
    exe: Path, dataset, work: Path, epochs: int, train_box: int, zdim: int = 8, dim: int = 256,
    seed: int = 0, per_image_samples: int = 200, neighbourhood_fractions=(0.01, 0.05),
) -> dict:
    """Train cryoDRGN on ``dataset`` (a generated :class:`SyntheticDataset`) and score it.

    :return: a result row with the keys hetero's rows have (``ari``, ``ami``,
        ``per_state_auc_mean``, ``per_state_res_0.5_mean``, ``per_image_fsc_auc_mean``,
        ``neighbourhood_similarity``, ``auc_ceiling``, ``train_seconds``, ``peak_rss_mb``), plus
        ``per_state_fsc`` and ``map_sign`` (+1: the decoded maps correlate positively with the
        truth, as they must).
    """
    import torch

    from hetero.analysis import metrics as M
    from hetero.analysis.volumes import resample_to_box
    from hetero.data.io.cryodrgn import safe_load_pickle
    from hetero.data.synthetic import load_truth

    work.mkdir(parents=True, exist_ok=True)
    folder = Path(dataset.truth_dir)
    box, apix = dataset.box_size, dataset.pixel_size_angstrom
    train_apix = apix * box / train_box
    stack = work / f"particles.{train_box}.mrcs"
    prep_s = 0.0
    if not stack.exists():
        s1, _ = run_measured([exe, "downsample", folder / "particles.mrcs", "-D", train_box, "-o", stack],
                             work / "downsample.log")
        s2, _ = run_measured([exe, "parse_pose_star", folder / "particles.star", "-D", box, "-o", work / "pose.pkl"],
                             work / "parse_pose.log")
        s3, _ = run_measured([exe, "parse_ctf_star", folder / "particles.star", "-D", box, "--Apix", apix,
                              "-o", work / "ctf.pkl"], work / "parse_ctf.log")
        prep_s = s1 + s2 + s3
    shutil.rmtree(work / "train", ignore_errors=True)
    train_s, peak = run_measured(
        [exe, "train_vae", stack, "--poses", work / "pose.pkl", "--ctf", work / "ctf.pkl", "--zdim", zdim,
         "-n", epochs, "-o", work / "train", "--no-analysis", "--seed", seed,
         "--enc-dim", dim, "--enc-layers", 3, "--dec-dim", dim, "--dec-layers", 3],
        work / "train_vae.log",
    )
    z = np.asarray(safe_load_pickle(work / "train" / "z.pkl"), dtype=np.float64)
    truth = load_truth(folder)
    labels = np.asarray(truth["labels"])
    vols = torch.from_numpy(truth["volumes"])
    n = len(z)
    row: dict = {"model": f"cryodrgn {CRYODRGN_VERSION} ({dim}x3)", "train_seconds": round(train_s, 1),
                 "prepare_seconds": round(prep_s, 1), "peak_rss_mb": round(peak)}
    start = time.perf_counter()
    scores = M.clustering_scores(z, labels, seed=0)
    row["ari"], row["ami"] = scores["ari"], scores["ami"]

    def on_grid(maps: np.ndarray) -> torch.Tensor:
        return resample_to_box(torch.from_numpy(maps), train_apix, box, apix)

    states = np.unique(labels)
    reps = M.state_representatives(z, labels)
    maps = on_grid(_decode(exe, work, z[[reps[int(s)] for s in states]], train_apix, "states"))
    per_state = []
    for i, s in enumerate(states):
        r = M.fsc_summary(maps[i], vols[int(s)], apix)
        r.pop("curve")
        per_state.append({"state": int(s), "particle": reps[int(s)], **r})
    sign = float(np.sign(np.mean([np.corrcoef(maps[i].ravel().numpy(), vols[int(s)].ravel().numpy())[0, 1]
                                  for i, s in enumerate(states)])))
    row.update(
        per_state_fsc=per_state, map_sign=sign,
        per_state_auc_mean=float(np.mean([r["auc"] for r in per_state])),
        **{"per_state_res_0.5_mean": float(np.mean([r["res_0.5"] for r in per_state]))},
        auc_ceiling=(box // 2 - 1) / box,
    )
    idx = M.per_image_sample(n, per_image_samples)
    if len(idx):
        pred = on_grid(_decode(exe, work, z[idx], train_apix, "images"))
        aucs = np.array(M.fsc_aucs(pred, vols[torch.as_tensor(labels[idx], dtype=torch.long)]))
        row["per_image_fsc_auc_mean"] = float(aucs.mean())
    row["neighbourhood_similarity"] = None
    if truth.get("t") is not None:
        row["neighbourhood_similarity"] = M.neighbourhood_scores(z, truth["t"], neighbourhood_fractions)
    row["analyze_seconds"] = round(time.perf_counter() - start, 1)
    return row
