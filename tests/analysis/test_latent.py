"""Latent-space tools: PCA, k-means snapping, traversals, UMAP."""

from __future__ import annotations

import numpy as np
import pytest

from hetero.analysis import latent as L


@pytest.fixture
def z():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 4)) * 5
    return (centres[np.repeat(np.arange(3), 30)] + rng.normal(size=(90, 4))).astype(np.float32)


def test_kmeans_centres_are_particles(z):
    km = L.kmeans(z, 3, seed=0)
    assert km.center_indices.dtype == np.int64 and km.center_indices.shape == (3,)
    assert np.all((km.center_indices >= 0) & (km.center_indices < len(z)))
    assert km.counts.sum() == len(z) and sorted(km.counts) == [30, 30, 30]
    for c, i in zip(km.centers, km.center_indices):
        d = np.linalg.norm(z - c, axis=1)
        assert d[i] == pytest.approx(d.min(), rel=1e-6)
    # Each snapped particle belongs to the cluster of its centre.
    np.testing.assert_array_equal(km.labels[km.center_indices], np.arange(3))


def test_kmeans_too_many_clusters(z):
    with pytest.raises(ValueError, match="larger than the number of particles"):
        L.kmeans(z[:5], 6)


def test_nearest_particles_chunks(z):
    pts = z[[4, 50, 77]] + 1e-3
    np.testing.assert_array_equal(L.nearest_particles(z, pts, chunk=7), [4, 50, 77])


def test_pca_and_traversal(z):
    pcs = L.pca(z, 10)
    assert pcs.n_components == 4  # capped at Z
    assert np.all(np.diff(pcs.explained_variance_ratio) <= 1e-9)
    assert pcs.explained_variance_ratio.sum() == pytest.approx(1.0)
    path = L.pc_traversal(pcs, 0, n_steps=7)
    assert path.shape == (7, 4)
    coords = (path - pcs.mean) @ pcs.components[0]
    lo, hi = np.percentile(pcs.coords[:, 0], [5, 95])
    assert coords[0] == pytest.approx(lo, abs=1e-6) and coords[-1] == pytest.approx(hi, abs=1e-6)
    with pytest.raises(ValueError):
        L.pc_traversal(pcs, 4)


def test_homogeneous_latents_rejected():
    with pytest.raises(ValueError, match="dimension 0"):
        L.pca(np.zeros((10, 0)))


def test_umap_subsample_then_transform(z):
    emb = L.umap_embedding(z, n_neighbors=10, max_points=60, seed=0)
    assert emb.shape == (90, 2) and np.isfinite(emb).all()


def _posteriors(seed: int = 0) -> np.ndarray:
    """A class3d-like embedding: confident posteriors of 2 classes, 12 uncertain particles."""
    rng = np.random.default_rng(seed)
    p = np.repeat([[1.0, 0.0], [0.0, 1.0]], 300, axis=0)
    p[:12, 0] = rng.uniform(0.5, 0.9, 12)
    p[:12, 1] = 1 - p[:12, 0]
    return p


def test_kmeans_spends_spare_centres_on_single_particles():
    km = L.kmeans(_posteriors(), 20, seed=0)
    assert (km.counts <= 2).sum() >= 10  # what the refit exists for


def test_kmeans_without_specks_refits_with_the_groups_there_are():
    km, tried = L.kmeans_without_specks(_posteriors(), 20, min_size=3, seed=0)
    assert tried[0] == 20 and len(tried) >= 2 and km.n_clusters == tried[-1] < 20
    assert km.counts.min() >= 3 and sorted(km.counts)[-2:][0] >= 290
    # separated groups of sufficient size are left alone
    z = np.random.default_rng(1).normal(size=(200, 3)) + np.repeat(np.eye(3) * 20, [50, 50, 100], axis=0)
    km3, tried3 = L.kmeans_without_specks(z, 3, min_size=3, seed=0)
    assert tried3 == [3] and sorted(km3.counts) == [50, 50, 100]
