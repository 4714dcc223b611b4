"""Real-space masks (centred on ``D // 2``, raised-cosine edges) and HEALPix classes of
viewing directions (NESTED, ``theta = tilt``, ``phi = rot``; psi does not matter)."""

from __future__ import annotations

import math

import healpy
import numpy as np
import pytest
import torch

from hetero.physics.healpix import (
    healpix_class,
    healpix_class_of_direction,
    healpix_pixel_directions,
    n_healpix_classes,
)
from hetero.physics.masks import circular_mask, soft_mask_from_volume, spherical_mask
from hetero.physics.rotations import euler_to_matrix, random_rotations


def _brute_force_radius(shape: tuple[int, ...]) -> torch.Tensor:
    grids = np.meshgrid(*[np.arange(n) - n // 2 for n in shape], indexing="ij")
    return torch.from_numpy(np.sqrt(sum(g.astype(np.float64) ** 2 for g in grids)))


# ------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 33])
def test_hard_circular_mask_radius(size):
    m = circular_mask(size, radius_px=10.0)
    assert m.shape == (size, size)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    r = _brute_force_radius((size, size))
    assert torch.equal(m.bool(), r <= 10.0)
    c = size // 2
    assert m[c, c] == 1 and m[c, c + 10] == 1 and m[c, c + 11] == 0 and m[c - 10, c] == 1
    # Default radius D / 2.
    assert torch.equal(circular_mask(size).bool(), r <= size / 2)


def test_soft_circular_mask_edge():
    size, radius, edge = 40, 8.0, 4.0
    m = circular_mask(size, radius_px=radius, soft_edge_px=edge).double()
    r = _brute_force_radius((size, size))
    assert m.min() >= 0 and m.max() <= 1
    assert torch.all(m[r <= radius] == 1)
    assert torch.all(m[r >= radius + edge] == 0)
    inside_edge = (r > radius) & (r < radius + edge)
    assert torch.all((m[inside_edge] > 0) & (m[inside_edge] < 1))
    # Raised cosine: 0.5 half-way through the edge, monotone non-increasing with radius.
    assert m[20, 30].item() == pytest.approx(0.5, abs=1e-6)  # r = 10
    expected = 0.5 * (1 + torch.cos(math.pi * ((r - radius) / edge).clamp(0, 1)))
    torch.testing.assert_close(m, expected, atol=1e-6, rtol=0)
    order = torch.argsort(r.flatten())
    assert torch.all(torch.diff(m.flatten()[order]) <= 1e-7)


def test_spherical_mask():
    size = 24
    r = _brute_force_radius((size,) * 3)
    hard = spherical_mask(size, radius_px=7.0)
    assert hard.shape == (size,) * 3
    assert torch.equal(hard.bool(), r <= 7.0)
    assert abs(hard.sum().item() - 4 / 3 * math.pi * 7**3) < 0.05 * 4 / 3 * math.pi * 7**3
    soft = spherical_mask(size, radius_px=6.0, soft_edge_px=3.0).double()
    assert soft.min() >= 0 and soft.max() <= 1
    assert torch.all(soft[r <= 6] == 1) and torch.all(soft[r >= 9] == 0)
    order = torch.argsort(r.flatten())
    assert torch.all(torch.diff(soft.flatten()[order]) <= 1e-7)


def test_soft_mask_from_volume():
    size = 32
    r = _brute_force_radius((size,) * 3).float()
    vol = (r <= 5).float() * 2.0
    binary = soft_mask_from_volume(vol, threshold=1.0, extend_px=2, soft_edge_px=0)
    # No edge and no extension: just the thresholded map.
    assert torch.equal(soft_mask_from_volume(vol, 1.0, extend_px=0, soft_edge_px=0), (vol > 1).float())
    # Extension by 2 px: the ball of radius 5 grows to radius ~7.
    assert torch.all(binary[r <= 6.5] == 1) and torch.all(binary[r > 7.01] == 0)

    m = soft_mask_from_volume(vol, threshold=1.0, extend_px=2, soft_edge_px=3)
    assert m.min() >= 0 and m.max() <= 1
    assert torch.equal(m == 1, binary == 1)
    partial = (m > 0) & (m < 1)
    assert r[partial].min() >= 6.5 and r[partial].max() <= 10.5
    # The edge is isotropic (Euclidean distance): no voxel within ~3 px of the extended ball
    # is cut to 0, also along the cube diagonals (a city-block distance put zeros at r = 8.66).
    assert r[m == 0].min() >= 9.4
    c = size // 2
    along_x = m[c, c, c:]
    along_diagonal = torch.stack([m[c + i, c + i, c + i] for i in range(size // 2)])
    assert torch.all(torch.diff(along_x) <= 0) and torch.all(torch.diff(along_diagonal) <= 0)


# ------------------------------------------------------------------------------------------
# HEALPix
# ------------------------------------------------------------------------------------------


def test_number_of_classes():
    assert n_healpix_classes(1) == 12
    assert n_healpix_classes(2) == 48
    assert n_healpix_classes(4) == 192
    classes = healpix_class(random_rotations(5000, generator=torch.Generator().manual_seed(0)), 2)
    assert classes.dtype == np.int64 and classes.shape == (5000,)
    assert set(classes.tolist()) == set(range(48))


def test_plus_z_is_in_a_north_polar_pixel_and_minus_z_in_a_south_one():
    nside = 2
    thetas, _ = healpy.pix2ang(nside, np.arange(48), nest=True)
    north = set(np.argsort(thetas)[:4].tolist())
    south = set(np.argsort(thetas)[-4:].tolist())
    eye = torch.eye(3, dtype=torch.float64)[None]
    up = healpix_class(eye, nside)[0]
    assert up == healpy.ang2pix(nside, 0.0, 0.0, nest=True)
    assert up in north
    # Any psi, and rot irrelevant at the pole.
    assert set(healpix_class(euler_to_matrix(torch.tensor([[0.0, 0.0, 77.0]])), nside).tolist()) == {up}
    # -z (tilt 180): the south pole is a vertex of 4 pixels; it must be one of them.
    down = healpix_class(euler_to_matrix(torch.tensor([[0.0, 180.0, 0.0]])), nside)[0]
    assert down in south


@pytest.mark.parametrize("nside", [1, 2, 4])
def test_pixel_centres_round_trip(nside):
    n = n_healpix_classes(nside)
    dirs = healpix_pixel_directions(nside)
    assert dirs.shape == (n, 3)
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(n, dtype=torch.float64))
    assert np.array_equal(healpix_class_of_direction(dirs, nside), np.arange(n))
    assert np.array_equal(healpix_class_of_direction(3.0 * dirs, nside), np.arange(n))  # any length
    # Poses whose viewing direction is a pixel centre: tilt = theta, rot = phi, psi arbitrary.
    theta = torch.acos(dirs[:, 2].clamp(-1, 1))
    phi = torch.atan2(dirs[:, 1], dirs[:, 0])
    psi = torch.rand(n, generator=torch.Generator().manual_seed(nside), dtype=torch.float64) * 360 - 180
    a = euler_to_matrix(torch.stack([torch.rad2deg(phi), torch.rad2deg(theta), psi], -1))
    assert np.array_equal(healpix_class(a, nside), np.arange(n))


def test_classes_ignore_inplane_rotation():
    g = torch.Generator().manual_seed(1)
    base = torch.rand(200, 3, generator=g, dtype=torch.float64) * torch.tensor([360.0, 180.0, 360.0])
    ref = healpix_class(euler_to_matrix(base), 2)
    for _ in range(5):
        other = base.clone()
        other[:, 2] = torch.rand(200, generator=g, dtype=torch.float64) * 360 - 180
        assert np.array_equal(healpix_class(euler_to_matrix(other), 2), ref)
    # ... whereas changing the tilt moves most of them (the test can fail).
    tilted = base.clone()
    tilted[:, 1] = (tilted[:, 1] + 60) % 180
    assert (healpix_class(euler_to_matrix(tilted), 2) != ref).mean() > 0.5


def test_healpix_class_accepts_numpy_and_float32():
    a = random_rotations(50, generator=torch.Generator().manual_seed(2))
    ref = healpix_class(a, 2)
    assert np.array_equal(healpix_class(a.numpy(), 2), ref)
    assert np.array_equal(healpix_class(a.float(), 2), ref)
