"""Pseudo-energy landscapes: Boltzmann energies, interpolation identical to scipy's, exact
gradients, minima, particle-density landscapes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.interpolate import CloughTocher2DInterpolator, LinearNDInterpolator

from hetero.analysis.landscape import (
    Landscape,
    find_minima,
    pseudo_energy,
    volume_density_landscape,
)


def _scattered(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-3, 3, (n, 2))


def _double_well(p):
    x, y = p[:, 0], p[:, 1]
    return (x**2 - 1) ** 2 + 0.5 * y**2 + 0.1 * x


def test_pseudo_energy_is_boltzmann():
    g = pseudo_energy([1, 1, 2, 0])
    np.testing.assert_allclose(g[:3], -np.log([0.25, 0.25, 0.5]))
    assert np.isinf(g[3])
    with pytest.raises(ValueError):
        pseudo_energy([0, 0])
    with pytest.raises(ValueError):
        pseudo_energy([1, -1])


@pytest.mark.parametrize("method,reference", [("linear", LinearNDInterpolator), ("cubic", CloughTocher2DInterpolator)])
def test_energy_equals_scipy_interpolant(method, reference):
    pts = _scattered()
    g = _double_well(pts)
    land = Landscape.from_points(pts, g, method)
    q = np.random.default_rng(1).uniform(-3.5, 3.5, (2000, 2))
    ours, theirs = land.energy(q), reference(pts, g)(q)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    assert np.isnan(ours).any()  # some queries lie outside the hull
    np.testing.assert_allclose(ours[~np.isnan(ours)], theirs[~np.isnan(theirs)], atol=1e-11)


def test_gradient_is_the_derivative_of_the_interpolant():
    pts = _scattered()
    land = Landscape.from_points(pts, _double_well(pts), "cubic")
    q = np.random.default_rng(2).uniform(-2, 2, (2000, 2))
    d = 1e-6
    fd = np.stack(
        [
            (land.energy(q + (d, 0)) - land.energy(q - (d, 0))) / (2 * d),
            (land.energy(q + (0, d)) - land.energy(q - (0, d))) / (2 * d),
        ],
        1,
    )
    err = np.abs(land.gradient(q) - fd)
    # exact except where the stencil straddles two pieces (C1: the error is O(d))
    assert np.median(err) < 1e-8 and err.max() < 1e-4


def test_linear_landscape_of_a_plane_is_exact():
    pts = _scattered(50)
    g = 2.0 * pts[:, 0] - 3.0 * pts[:, 1] + 1.0
    # cubic: scipy estimates the node gradients iteratively (tolerance 1e-6)
    for method, atol in (("linear", 1e-9), ("cubic", 1e-5)):
        land = Landscape.from_points(pts, g, method)
        q = np.random.default_rng(3).uniform(-1, 1, (100, 2))
        np.testing.assert_allclose(land.energy(q), 2.0 * q[:, 0] - 3.0 * q[:, 1] + 1.0, atol=atol)
        np.testing.assert_allclose(land.gradient(q), np.tile([2.0, -3.0], (100, 1)), atol=100 * atol)


def test_xy_polynomials_reproduce_the_pieces():
    pts = _scattered(100)
    land = Landscape.from_points(pts, _double_well(pts), "cubic")
    q = np.random.default_rng(4).uniform(-1, 1, (300, 2))
    s = land.locate(q)
    piece = land.pieces(q, s)
    poly = land.xy_polynomials()[piece]
    dq = q - land.origin[piece]
    value = sum(poly[:, i, j] * dq[:, 0] ** i * dq[:, 1] ** j for i in range(4) for j in range(4 - i))
    np.testing.assert_allclose(value, land.energy(q), atol=1e-10)


def test_minima_of_a_double_well():
    x = np.linspace(-2, 2, 41)
    gx, gy = np.meshgrid(x, x, indexing="ij")
    pts = np.stack([gx.ravel(), gy.ravel()], 1)
    land = Landscape.from_points(pts, _double_well(pts), "cubic")
    pos, energy = find_minima(land, min_separation=0.5)
    assert len(pos) == 2
    # deepest first: the tilt 0.1 x makes the left well lower
    assert pos[0, 0] < 0 < pos[1, 0] and energy[0] < energy[1]
    np.testing.assert_allclose(np.abs(pos[:, 0]), 1.0, atol=0.05)
    np.testing.assert_allclose(pos[:, 1], 0.0, atol=0.05)


def test_density_landscape_has_its_minima_at_the_particle_clusters():
    rng = np.random.default_rng(0)
    xy = np.concatenate([rng.normal((-5, 0), 1.0, (3000, 2)), rng.normal((5, 2), 1.0, (1500, 2))])
    land = Landscape.from_density(xy, bins=48, smoothing=1.0)
    pos, energy = find_minima(land, min_separation=4.0, max_minima=2)
    assert np.linalg.norm(pos[0] - (-5, 0)) < 0.8 and np.linalg.norm(pos[1] - (5, 2)) < 0.8
    # twice the particles -> lower by about ln 2
    assert 0.4 < energy[1] - energy[0] < 1.0
    assert land.contains(xy).all()


def test_project_inside_moves_outside_points_onto_the_hull():
    pts = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], float)
    land = Landscape.from_points(pts, np.arange(4.0), "linear")
    q = land.project_inside(np.array([[2.0, 0.5], [0.5, 0.5], [-1.0, -1.0]]))
    assert land.contains(q).all()
    np.testing.assert_allclose(q, [[1, 0.5], [0.5, 0.5], [0, 0]], atol=1e-6)


def test_volume_density_landscape_has_a_well_per_group_of_volumes():
    """Three groups of 10 volumes; group A's volumes hold 400-1000 particles, B's and C's
    50-200. The paper's per-volume energy has minima only where a volume out-counts all its
    Delaunay neighbours: none in group B here. The count-weighted density has one well per
    group, at the group's centre."""
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [6.0, 0.0], [3.0, 5.0]])
    xy = np.concatenate([c + rng.normal(0, 0.5, (10, 2)) for c in centres])
    counts = np.concatenate([rng.integers(400, 1000, 10), rng.integers(50, 200, 10), rng.integers(50, 200, 10)])
    per_volume, _ = find_minima(Landscape.from_points(xy, pseudo_energy(counts)))
    assert min(np.linalg.norm(per_volume - centres[1], axis=1)) > 3.0  # group B has no minimum
    land, bandwidth = volume_density_landscape(xy, counts)
    from scipy.spatial import cKDTree

    assert bandwidth == pytest.approx(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]))
    minima, energy = find_minima(land)
    assert len(minima) == 3
    assert np.linalg.norm(minima[0] - centres[0]) < 0.5  # the most populated group is deepest
    nearest = np.linalg.norm(minima[:, None] - centres[None], axis=2)  # (minima, groups)
    assert sorted(nearest.argmin(1)) == [0, 1, 2] and nearest.min(1).max() < 1.0  # one per group (sd 0.5)
    assert np.all(land.contains(xy))  # every volume inside the landscape
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        volume_density_landscape(xy, counts, bandwidth=0.0)
