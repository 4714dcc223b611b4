"""The oracle classifier of a synthetic dataset: the physical limit of assigning states.

Each image was made as ``image_i = s * clean_i(state) + n_i`` with white Gaussian noise of unit
variance (:mod:`hetero.data.synthetic.simulate`). Given everything the simulator knew except the
state (true pose, shift, CTF *with* its B-factor envelope, the image scale ``s``), the
maximum-likelihood state is the one whose noiseless image is nearest in squared distance::

    k_i = argmin_k || image_i - s * clean_i(k) ||^2

With equal state priors (the discrete and compositional sets are split evenly) this is also the
Bayes-optimal assignment, so no method that has to learn poses' worth of information from the
same images can do better on average. Benchmarks quote a method's ARI as a fraction of the
oracle's ARI on the same data.

For the continuous kind the oracle estimates the hinge parameter ``t`` by a grid search
(a coarse grid over ``[0, 1]``, then a fine grid around the coarse minimum) and assigns the bin
of ``t`` the ground truth uses (``n_states`` equal bins).

Example usage::

    ds = SyntheticDataset(kind="discrete", n_particles=2000, snr=0.05)
    result = oracle_assignment(ds)
    print(result["ari"], result["accuracy"])
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from hetero.data.synthetic.molecule import PseudoAtomMolecule
from hetero.data.synthetic.simulate import STACK_NAME, SyntheticDataset

__all__ = ["oracle_assignment"]

#: per-particle arrays of ``truth.npz`` that :meth:`SyntheticDataset.clean_images` reads
_PER_PARTICLE = ("labels", "t", "rotations", "shifts_px", "defocus_u_angstrom", "defocus_v_angstrom",
                 "defocus_angle_deg", "b_factor")


def _residuals(
    ds: SyntheticDataset, sub: dict, images: torch.Tensor, scale: float, key: str,
    candidates: np.ndarray, molecule: PseudoAtomMolecule,
) -> torch.Tensor:
    """``(B, C)`` squared distances of ``images (B, D, D)`` to the clean images of each candidate
    value of ``sub[key]`` (a state label or a hinge ``t``); ``candidates`` is ``(C,)`` shared
    or ``(B, C)`` per image."""
    b = images.shape[0]
    cand = np.broadcast_to(np.asarray(candidates), (b, np.shape(candidates)[-1]))
    out = torch.empty(b, cand.shape[1], dtype=torch.float64)
    local = np.arange(b)
    for c in range(cand.shape[1]):
        trial = dict(sub)
        trial[key] = cand[:, c].copy()
        clean, _ = ds.clean_images(trial, local, molecule)
        out[:, c] = ((images - scale * clean).double() ** 2).sum((-2, -1))
    return out


def oracle_assignment(
    dataset: SyntheticDataset,
    chunk_size: int = 256,
    n_coarse: int | None = None,
    n_fine: int = 9,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Assign every particle of ``dataset`` its maximum-likelihood state (see module docstring).

    :param dataset: the synthetic dataset (generated first if it is not cached).
    :param chunk_size: particles per batch (bounds memory: ``chunk_size x D x D`` per candidate).
    :param n_coarse: continuous kind: points of the coarse ``t`` grid (default
        ``4 * n_states + 1``). :param n_fine: points of the fine grid, which spans one coarse
        step either side of the coarse minimum.
    :param progress: called as ``progress(done, total)`` after each chunk.
    :return: dict with ``labels`` ``(N,)`` int64 (the oracle's states), ``true_labels``,
        ``ari``, ``ami``, ``accuracy`` (fraction equal to the truth), ``kind``, ``snr_box`` and,
        for the continuous kind, ``t`` ``(N,)`` (estimated hinge parameter), ``t_rmse`` and
        ``t_pearson`` against the true ``t``.
    """
    # sklearn's scores directly: the data layer does not import hetero.analysis (it sits above).
    from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

    from hetero.data.io.mrc import ImageStack

    dataset.ensure()
    folder = Path(dataset.truth_dir)
    with np.load(folder / "truth.npz") as npz:
        truth = {k: npz[k] for k in npz.files}
    scale = float(truth["image_scale"])
    n, k = dataset.n_particles, dataset.n_states
    stack = ImageStack(folder / STACK_NAME)
    molecule = PseudoAtomMolecule(dataset.molecule_seed)
    continuous = dataset.kind == "continuous"
    labels = np.empty(n, dtype=np.int64)
    t_hat = np.empty(n) if continuous else None
    n_coarse = int(n_coarse or 4 * k + 1)
    coarse = np.linspace(0.0, 1.0, n_coarse)
    step = coarse[1] - coarse[0]
    with torch.inference_mode():
        for start in range(0, n, chunk_size):
            idx = np.arange(start, min(n, start + chunk_size))
            sub = {key: truth[key][idx] for key in _PER_PARTICLE if key in truth}
            images = torch.from_numpy(stack.read(idx))
            if not continuous:
                r = _residuals(dataset, sub, images, scale, "labels", np.arange(k), molecule)
                labels[idx] = r.argmin(1).numpy()
            else:
                r = _residuals(dataset, sub, images, scale, "t", coarse, molecule)
                best = coarse[r.argmin(1).numpy()]
                fine = np.clip(best[:, None] + np.linspace(-step, step, n_fine)[None, :], 0.0, 1.0)
                r = _residuals(dataset, sub, images, scale, "t", fine, molecule)
                t_hat[idx] = fine[np.arange(len(idx)), r.argmin(1).numpy()]
                labels[idx] = np.minimum((t_hat[idx] * k).astype(np.int64), k - 1)
            if progress is not None:
                progress(int(idx[-1]) + 1, n)
    stack.close()
    true = truth["labels"].astype(np.int64)
    out = {
        "kind": dataset.kind,
        "snr_box": float(truth["snr_box"]),
        "labels": labels,
        "true_labels": true,
        "accuracy": float((labels == true).mean()),
        "ari": float(adjusted_rand_score(true, labels)),
        "ami": float(adjusted_mutual_info_score(true, labels)),
    }
    if continuous:
        t_true = truth["t"]
        out.update(
            t=t_hat,
            t_rmse=float(np.sqrt(np.mean((t_hat - t_true) ** 2))),
            t_pearson=float(np.corrcoef(t_hat, t_true)[0, 1]),
        )
    return out
