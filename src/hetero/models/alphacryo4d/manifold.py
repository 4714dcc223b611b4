"""Stage 4 of AlphaCryo4D: embed the resampled volumes in 2-D (t-SNE, or UMAP).

Each volume is represented by its z-scored voxels concatenated with its autoencoder feature
map, each feature standardised across volumes (paper eq. 4; the reference's
``reshape((-1, N))`` standardised arbitrary strided groups of values instead). Only the
pairwise squared Euclidean distances of these long vectors are needed; they are accumulated
from slabs of the memory-mapped volumes, so the ``(V, D^3 + F)`` matrix is never built.

t-SNE is scikit-learn's with every parameter explicit (the reference relied on
scikit-learn 0.24's defaults, which changed in 1.2): random initialisation, learning rate
200, early exaggeration 12, Barnes-Hut with angle 0.5, 1000 iterations, perplexity 30, on
squared Euclidean distances (what ``metric="euclidean"`` uses internally).

Example usage::

    d2 = volume_distances(volumes, features)                 # (V, V)
    xy = tsne(d2, perplexity=30, seed=0)                     # (V, 2)
"""

from __future__ import annotations

import numpy as np

from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)


def standardize_columns(x: np.ndarray) -> np.ndarray:
    """Per-column z-score across rows (each feature across volumes); constant columns -> 0."""
    x = np.asarray(x, dtype=np.float64)
    std = x.std(0)
    return np.where(std > 0, (x - x.mean(0)) / np.where(std > 0, std, 1.0), 0.0)


def _gram_to_sq_distances(gram: np.ndarray) -> np.ndarray:
    diag = np.diag(gram)
    d2 = diag[:, None] + diag[None, :] - 2.0 * gram
    np.fill_diagonal(d2, 0.0)
    return np.maximum(d2, 0.0)


def volume_sq_distances(
    volumes, mask: np.ndarray | None = None, slab_bytes: int = 256 << 20, indices: np.ndarray | None = None
) -> np.ndarray:
    """Squared distances between the z-scored volumes (each over its own voxels).

    :param volumes: ``(V, D, D, D)`` array or memory map (read in z-slabs).
    :param mask: optional ``(D, D, D)`` focus mask multiplied in before z-scoring.
    :param indices: use only these volumes (rows of the result in this order).
    :return: ``(V', V')`` float64.
    """
    rows = np.arange(volumes.shape[0]) if indices is None else np.asarray(indices, dtype=np.int64)
    n, d = len(rows), volumes.shape[1]
    mean = np.zeros(n)
    sq = np.zeros(n)
    count = float(d**3)
    planes = max(1, int(slab_bytes // max(1, n * d * d * 8)))
    slabs = [(z, min(d, z + planes)) for z in range(0, d, planes)]

    def slab(z0, z1):
        x = np.asarray(volumes[rows, z0:z1], dtype=np.float64).reshape(n, -1)
        if mask is not None:
            x = x * np.asarray(mask[z0:z1], dtype=np.float64).reshape(1, -1)
        return x

    for z0, z1 in slabs:
        x = slab(z0, z1)
        mean += x.sum(1)
        sq += (x * x).sum(1)
    mean /= count
    std = np.sqrt(np.maximum(sq / count - mean**2, 0.0))
    scale = np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 0.0)
    gram = np.zeros((n, n))
    for z0, z1 in slabs:
        x = (slab(z0, z1) - mean[:, None]) * scale[:, None]
        gram += x @ x.T
    return _gram_to_sq_distances(gram)


def volume_distances(
    volumes,
    features: np.ndarray | None,
    volume_weight: float = 1.0,
    feature_weight: float = 1.0,
    standardize_features: bool = True,
    mask: np.ndarray | None = None,
    volume_indices: np.ndarray | None = None,
) -> np.ndarray:
    """Squared distances of ``[volume_weight * zscored volume, feature_weight * features]``.

    :param volumes: ``(V, D, D, D)`` (memory map is fine); ``None`` or weight 0 to skip.
    :param features: ``(V, F)`` autoencoder features, or ``None`` (volumes only).
    :param standardize_features: z-score each feature across volumes (paper eq. 4).
    :param volume_indices: the volumes (rows of ``volumes``) matching the rows of ``features``.
    :return: ``(V, V)`` float64.
    """
    parts = []
    if volumes is not None and volume_weight:
        parts.append(volume_weight**2 * volume_sq_distances(volumes, mask, indices=volume_indices))
    if features is not None and feature_weight:
        f = standardize_columns(features) if standardize_features else np.asarray(features, np.float64)
        parts.append(feature_weight**2 * _gram_to_sq_distances(f @ f.T))
    if not parts:
        raise ValueError("volume_distances: nothing to compare (no volumes and no features)")
    return sum(parts)


def tsne(
    sq_distances: np.ndarray,
    perplexity: float = 30.0,
    max_iter: int = 1000,
    learning_rate: float = 200.0,
    early_exaggeration: float = 12.0,
    init: str = "random",
    method: str = "barnes_hut",
    angle: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """2-D t-SNE of precomputed squared distances ``(V, V)``; returns ``(V, 2)`` float64 in
    raw t-SNE units (the landscape radius and endpoints are given in these units).

    ``perplexity`` must be below ``V``; it is lowered to ``(V - 1) / 3`` with a warning
    when the set is too small.
    """
    from sklearn.manifold import TSNE

    n = len(sq_distances)
    if perplexity >= n:
        new = max(1.0, (n - 1) / 3)
        log.warning(f"t-SNE: perplexity {perplexity} >= {n} volumes; using {new:.1f}")
        perplexity = new
    model = TSNE(
        n_components=2,
        perplexity=float(perplexity),
        max_iter=int(max_iter),
        learning_rate=float(learning_rate),
        early_exaggeration=float(early_exaggeration),
        init=init,
        method=method,
        angle=float(angle),
        metric="precomputed",
        random_state=int(seed),
    )
    # a copy: scikit-learn's exact method modifies precomputed distances in place
    return model.fit_transform(np.array(sq_distances, dtype=np.float64)).astype(np.float64)


def umap(
    sq_distances: np.ndarray, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0
) -> np.ndarray:
    """2-D UMAP of the same distances (``sqrt`` of the squared ones); ``(V, 2)``."""
    import umap as umap_lib

    n = len(sq_distances)
    model = umap_lib.UMAP(
        n_components=2,
        n_neighbors=int(min(n_neighbors, n - 1)),
        min_dist=float(min_dist),
        metric="precomputed",
        random_state=int(seed),
    )
    return model.fit_transform(np.sqrt(np.asarray(sq_distances, dtype=np.float64))).astype(np.float64)
