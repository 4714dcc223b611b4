"""Latent-space analysis: PCA, UMAP, k-means with centres snapped to particles, PC traversals.

Pure functions on ``(N, Z)`` arrays of per-particle latents (``z_mu`` in input order); nothing
here touches models, files or plots.

Example usage::

    pcs = pca(z, n_components=10)              # pcs.coords (N, 10), pcs.explained_variance_ratio
    emb = umap_embedding(z, seed=0)            # (N, 2)
    km = kmeans(z, n_clusters=20, seed=0)      # km.labels (N,), km.center_indices (K,)
    path = pc_traversal(pcs, pc=0, n_steps=10) # (10, Z) points along PC1, 5th..95th percentile
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PCAResult:
    """Principal components of the latents.

    :param mean: ``(Z,)`` latent mean.
    :param components: ``(P, Z)`` unit principal axes, largest variance first.
    :param explained_variance: ``(P,)`` variance along each axis.
    :param explained_variance_ratio: ``(P,)`` fraction of the total variance.
    :param coords: ``(N, P)`` coordinates of every particle on the axes.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    coords: np.ndarray

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])


@dataclass
class KMeansResult:
    """k-means of the latents with each centre replaced by its nearest particle.

    :param labels: ``(N,)`` cluster of each particle (0-based).
    :param centers: ``(K, Z)`` k-means centroids.
    :param center_indices: ``(K,)`` index (input order) of the particle nearest each centroid.
    :param counts: ``(K,)`` particles per cluster.
    """

    labels: np.ndarray
    centers: np.ndarray
    center_indices: np.ndarray
    counts: np.ndarray

    @property
    def n_clusters(self) -> int:
        return int(self.centers.shape[0])


def _as_latents(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"latents must be (N, Z), got shape {z.shape}")
    if z.shape[1] == 0:
        raise ValueError("latents have dimension 0 (homogeneous model): nothing to analyse")
    return z


def pca(z: np.ndarray, n_components: int = 10) -> PCAResult:
    """PCA of ``(N, Z)`` latents; ``n_components`` is capped at ``min(N, Z)``."""
    from sklearn.decomposition import PCA

    z = _as_latents(z)
    n = max(1, min(int(n_components), z.shape[0], z.shape[1]))
    model = PCA(n_components=n, svd_solver="full").fit(z)
    return PCAResult(
        mean=model.mean_,
        components=model.components_,
        explained_variance=model.explained_variance_,
        explained_variance_ratio=model.explained_variance_ratio_,
        coords=model.transform(z),
    )


def nearest_particles(z: np.ndarray, points: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """Index of the particle (row of ``z``) nearest to each of ``points`` ``(K, Z)``: ``(K,)`` int64."""
    z = _as_latents(z)
    points = np.atleast_2d(np.asarray(points, dtype=np.float64))
    if points.shape[1] != z.shape[1]:
        raise ValueError(f"points have dimension {points.shape[1]}, latents {z.shape[1]}")
    best = np.full(len(points), np.inf)
    best_idx = np.zeros(len(points), dtype=np.int64)
    for start in range(0, len(z), chunk):
        block = z[start : start + chunk]
        # |p - z|^2 without the (K, n, Z) intermediate; |p|^2 is constant per row.
        d2 = (block**2).sum(-1)[None, :] - 2.0 * points @ block.T  # (K, n)
        j = np.argmin(d2, axis=1)
        val = d2[np.arange(len(points)), j] + (points**2).sum(-1)
        better = val < best
        best[better] = val[better]
        best_idx[better] = start + j[better]
    return best_idx


def kmeans(z: np.ndarray, n_clusters: int, seed: int = 0, n_init: int = 10) -> KMeansResult:
    """k-means (scikit-learn, k-means++) with centres snapped to the nearest particle.

    :raises ValueError: if ``n_clusters`` exceeds the number of particles.
    """
    from sklearn.cluster import KMeans

    z = _as_latents(z)
    k = int(n_clusters)
    if k < 1:
        raise ValueError(f"n_clusters must be >= 1, got {k}")
    if k > z.shape[0]:
        raise ValueError(f"n_clusters={k} is larger than the number of particles ({z.shape[0]})")
    model = KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit(z)
    labels = model.labels_.astype(np.int64)
    return KMeansResult(
        labels=labels,
        centers=model.cluster_centers_,
        center_indices=nearest_particles(z, model.cluster_centers_),
        counts=np.bincount(labels, minlength=k),
    )


def kmeans_without_specks(
    z: np.ndarray, n_clusters: int, min_size: int, seed: int = 0, n_init: int = 10
) -> tuple[KMeansResult, list[int]]:
    """:func:`kmeans`, refitted with fewer clusters while some hold fewer than ``min_size``
    particles.

    k-means spends its spare centres on isolated particles when the embedding has fewer
    separated groups than ``n_clusters``: on a class3d posterior embedding (one-hot rows, rank
    K - 1) ``n_clusters=20`` gave 2 clusters and 18 of one particle each. Each refit uses the
    number of clusters of the previous fit that held at least ``min_size``.

    :return: the result and the cluster counts tried (``[n_clusters]`` when nothing was small).
    """
    tried = [int(n_clusters)]
    km = kmeans(z, tried[-1], seed=seed, n_init=n_init)
    while True:
        kept = int((km.counts >= min_size).sum())
        if kept >= km.n_clusters or kept < 1:
            return km, tried
        tried.append(kept)
        km = kmeans(z, kept, seed=seed, n_init=n_init)


def umap_embedding(
    z: np.ndarray,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    max_points: int | None = 50000,
    seed: int = 0,
) -> np.ndarray:
    """2-D UMAP of the latents (seeded). With more than ``max_points`` particles UMAP is fitted
    on a random subsample and the rest are placed with ``transform``.

    :return: ``(N, 2)`` float32.
    """
    import warnings

    z = _as_latents(z)
    n = z.shape[0]
    if n < 4:
        raise ValueError(f"UMAP needs at least 4 particles, got {n}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba / n_jobs-with-seed chatter
        import umap

        reducer = umap.UMAP(
            n_neighbors=max(2, min(int(n_neighbors), n - 1)),
            min_dist=float(min_dist),
            n_components=2,
            random_state=seed,
        )
        if max_points and n > max_points:
            rng = np.random.default_rng(seed)
            fit_idx = np.sort(rng.choice(n, size=int(max_points), replace=False))
            out = np.empty((n, 2), dtype=np.float32)
            out[fit_idx] = reducer.fit_transform(z[fit_idx])
            rest = np.setdiff1d(np.arange(n), fit_idx)
            out[rest] = reducer.transform(z[rest])
            return out
        return reducer.fit_transform(z).astype(np.float32)


def pc_traversal(
    pcs: PCAResult, pc: int, n_steps: int = 10, low: float = 5.0, high: float = 95.0
) -> np.ndarray:
    """Latent points along principal axis ``pc`` (0-based) through the mean, from the ``low``
    to the ``high`` percentile of the particles' coordinates on that axis: ``(n_steps, Z)``."""
    if not 0 <= pc < pcs.n_components:
        raise ValueError(f"pc={pc} out of range (have {pcs.n_components} components)")
    lo, hi = np.percentile(pcs.coords[:, pc], [low, high])
    t = np.linspace(lo, hi, int(n_steps))
    return pcs.mean[None, :] + t[:, None] * pcs.components[pc][None, :]
