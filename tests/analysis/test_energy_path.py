"""Landscape + path + states for any embedding (particles or volumes)."""

from __future__ import annotations

import numpy as np
import pytest

from hetero.analysis.energy_path import landscape_figure, landscape_path


def _arc_particles(n=6000, seed=0):
    """Particles along a half circle with three dense states (ends and middle)."""
    rng = np.random.default_rng(seed)
    t = np.concatenate([rng.normal(0.0, 0.08, n // 3), rng.normal(np.pi / 2, 0.08, n // 4),
                        rng.normal(np.pi, 0.08, n // 3), rng.uniform(0, np.pi, n // 6)])
    r = 1 + rng.normal(0, 0.05, len(t))
    return 50 * np.stack([r * np.cos(t), r * np.sin(t)], 1), t


def test_path_through_the_particle_density_follows_the_arc(tmp_path):
    xy, t = _arc_particles(4000)
    lp = landscape_path(xy, k=5, min_separation=30, max_minima=3, bins=40, n_images=100)
    # the two deepest minima are the ends of the arc, the path runs along it (radius 50)
    np.testing.assert_allclose(np.sort(lp.path[[0, -1], 0]), [-50, 50], atol=8)
    r = np.hypot(lp.path[:, 0], lp.path[:, 1])
    assert np.all(np.abs(r - 50) < 8) and lp.path[:, 1].min() > -8
    # the middle state sits at the top of the arc, and particles near it are from there
    mid = lp.states[2]
    assert np.hypot(mid[0], mid[1] - 50) < 8
    assert np.all(np.abs(t[lp.labels == 2] - np.pi / 2) < 0.5)
    assert (lp.labels >= 0).mean() > 0.5
    png = landscape_figure(tmp_path / "land.png", lp, xy[::20])
    assert png.stat().st_size > 10_000


def test_units_do_not_matter():
    """Internally the embedding is rescaled: the same landscape whatever the units (minima on
    near-flat ground may move by a grid cell through rounding)."""
    xy, _ = _arc_particles(3000)
    kw = dict(k=3, states="minima", max_minima=3, bins=32, n_images=50, max_steps=100)
    a = landscape_path(xy, min_separation=30, **kw)
    b = landscape_path(xy / 40.0, min_separation=30 / 40.0, **kw)
    np.testing.assert_allclose(a.landscape.energies, b.landscape.energies, atol=1e-9)
    np.testing.assert_allclose(b.minima * 40.0, a.minima, atol=1.5)
    assert b.radius * 40 == pytest.approx(a.radius, rel=0.05)


def test_volume_landscape_with_counts_and_minima_states():
    rng = np.random.default_rng(1)
    centres = np.array([[-40.0, 0.0], [40.0, 0.0]])
    pts = np.concatenate([c + rng.normal(0, 6, (30, 2)) for c in centres])
    d = np.min(np.linalg.norm(pts[:, None] - centres[None], axis=-1), axis=1)
    counts = np.round(1000 * np.exp(-d / 5)) + 1
    lp = landscape_path(pts, counts, k=2, states="minima", min_separation=20, n_images=50, max_steps=300)
    order = np.argsort(lp.states[:, 0])
    np.testing.assert_allclose(lp.states[order], centres, atol=6)
    assert np.all(lp.labels[:30] == lp.labels[0]) and np.all(lp.labels[30:] == lp.labels[30])
