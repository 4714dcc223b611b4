"""Ground-truth metrics (see ``shared/notes/metrics.md``): clustering agreement, FSC against
true state volumes (per state and CryoBench-style per image) and neighbourhood similarity.

Volumes compared here must already be on the same grid (the *original* box and pixel size).

Example usage::

    scores = clustering_scores(z, true_labels, seed=0)          # {"ari", "ami", "k"}
    row = fsc_summary(decoded, truth_volume, apix)                # auc, res_0.5, res_0.143, curve
    idx = state_representatives(z, true_labels)                  # snapped mean latent per state
    sim = neighbourhood_similarity(z, t[:, None], k=50)          # in [0, 1]
"""

from __future__ import annotations

import numpy as np
import torch

from hetero.physics.fsc import fsc, fsc_auc, fsc_resolution


def ari_ami(true_labels: np.ndarray, pred_labels: np.ndarray) -> dict[str, float]:
    """Adjusted Rand index and adjusted mutual information between two labellings."""
    from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

    t = np.asarray(true_labels).ravel()
    p = np.asarray(pred_labels).ravel()
    if t.shape != p.shape:
        raise ValueError(f"label arrays differ in length: {t.shape} vs {p.shape}")
    return {"ari": float(adjusted_rand_score(t, p)), "ami": float(adjusted_mutual_info_score(t, p))}


def clustering_scores(z: np.ndarray, true_labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    """k-means of the latents with ``k`` = number of true states, scored by ARI and AMI
    (SOLVAR's protocol, used for CryoBench datasets)."""
    from hetero.analysis.latent import kmeans

    true_labels = np.asarray(true_labels).ravel()
    k = len(np.unique(true_labels))
    pred = kmeans(z, k, seed=seed).labels
    return {**ari_ami(true_labels, pred), "k": k}


def state_representatives(z: np.ndarray, true_labels: np.ndarray) -> dict[int, int]:
    """For each true state, the particle nearest (among all particles) to the mean latent of
    the state's particles (CryoBench's per-conformation protocol): ``{state: index}``."""
    from hetero.analysis.latent import nearest_particles

    z = np.asarray(z, dtype=np.float64)
    labels = np.asarray(true_labels).ravel()
    states = np.unique(labels)
    means = np.stack([z[labels == s].mean(0) for s in states])
    idx = nearest_particles(z, means)
    return {int(s): int(i) for s, i in zip(states, idx)}


def fsc_summary(
    volume: torch.Tensor, reference: torch.Tensor, apix: float, mask: torch.Tensor | None = None
) -> dict:
    """FSC of a ``(D, D, D)`` map against a reference on the same grid.

    :return: ``{"auc", "res_0.5", "res_0.143", "curve"}``: CryoBench AUC (ceiling
        ``(D/2 - 1)/D``), crossings of 0.5 and 0.143 in Å (Nyquist if never crossed), the curve as a list.
    """
    volume = torch.as_tensor(volume)
    reference = torch.as_tensor(reference)
    if volume.shape != reference.shape:
        raise ValueError(f"map {tuple(volume.shape)} and reference {tuple(reference.shape)} differ")
    d = int(volume.shape[-1])
    curve = fsc(volume, reference, mask)
    return {
        "auc": fsc_auc(curve, d),
        "res_0.5": fsc_resolution(curve, d, apix, 0.5),
        "res_0.143": fsc_resolution(curve, d, apix, 0.143),
        "curve": [float(c) for c in curve],
    }


def fsc_aucs(volumes: torch.Tensor, references: torch.Tensor) -> list[float]:
    """CryoBench FSC AUC of each map of ``(B, D, D, D)`` against the matching reference."""
    if volumes.shape != references.shape:
        raise ValueError(f"maps {tuple(volumes.shape)} and references {tuple(references.shape)} differ")
    d = int(volumes.shape[-1])
    return [fsc_auc(curve, d) for curve in fsc(volumes, references)]


def per_image_sample(n_particles: int, n_samples: int) -> np.ndarray:
    """CryoBench's evenly spaced image sample ``arange(0, N, N // n)`` (at most ``n``)."""
    n_samples = max(1, min(int(n_samples), int(n_particles)))
    step = max(1, n_particles // n_samples)
    return np.arange(0, n_particles, step)[:n_samples]


def neighbourhood_similarity(
    z: np.ndarray,
    truth: np.ndarray,
    k: int,
    max_points: int | None = 20000,
    seed: int = 0,
) -> float:
    """Mean fraction of each particle's ``k`` nearest latent neighbours (Euclidean, itself
    excluded) that are also among its ``k`` nearest neighbours in the ground-truth parameter.

    Ties in a discrete ground truth are broken by a tiny seeded jitter (as CryoBench does).
    Identical embeddings give 1; unrelated ones about ``k / N``.
    """
    from sklearn.neighbors import NearestNeighbors

    z = np.asarray(z, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    if t.ndim == 1:
        t = t[:, None]
    if z.ndim == 1:
        z = z[:, None]
    if len(z) != len(t):
        raise ValueError(f"latents ({len(z)}) and ground truth ({len(t)}) differ in length")
    rng = np.random.default_rng(seed)
    if max_points and len(z) > max_points:
        keep = np.sort(rng.choice(len(z), size=int(max_points), replace=False))
        z, t = z[keep], t[keep]
    n = len(z)
    k = int(k)
    if not 1 <= k < n:
        raise ValueError(f"k={k} must be between 1 and N-1={n - 1}")
    if len(np.unique(t, axis=0)) < n:
        scale = np.std(t, axis=0, keepdims=True) + 1e-12
        t = t + rng.normal(scale=1e-6, size=t.shape) * scale

    def neighbours(x: np.ndarray) -> np.ndarray:
        idx = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x, return_distance=False)
        out = np.empty((n, k), dtype=np.int64)
        for i, row in enumerate(idx):
            row = row[row != i]
            out[i] = row[:k]
        return out

    a, b = neighbours(z), neighbours(t)
    overlap = [len(np.intersect1d(a[i], b[i], assume_unique=True)) for i in range(n)]
    return float(np.mean(overlap) / k)


def neighbourhood_scores(
    z: np.ndarray, truth: np.ndarray, fractions=(0.01, 0.05), max_points: int = 20000, seed: int = 0
) -> dict[str, dict]:
    """:func:`neighbourhood_similarity` at ``k = fraction x m`` for each fraction, where ``m`` is
    ``min(N, max_points)``: ``{"0.01": {"k": k, "similarity": s}, ...}`` (random ~ ``k / m``)."""
    m = min(len(z), int(max_points))
    out = {}
    for frac in fractions:
        k = int(min(m - 1, max(1, round(float(frac) * m))))
        out[f"{float(frac):g}"] = {"k": k, "similarity": neighbourhood_similarity(z, truth, k, max_points=m,
                                                                                   seed=seed)}
    return out
