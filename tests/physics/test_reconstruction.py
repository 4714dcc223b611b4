"""Fourier backprojection with known poses (RELION's reconstructor): conformance (cryoDRGN toy),
CTF/Wiener reconstruction from the forward model ``render``, high defocus, amplitude and density
off-centre, the density-compensation kernel, accumulator algebra. Agreement with
``relion_reconstruct`` itself is in ``test_relion_conformance.py``."""

from __future__ import annotations

import math

import pytest
import torch

from hetero.models.components.renderer import Renderer
from hetero.physics.ctf import compute_ctf, ctf_table_compute
from hetero.physics.fourier import shift_images
from hetero.physics.fsc import fsc
from hetero.physics.projection import render
from hetero.physics.reconstruction import (
    BackprojectionAccumulator,
    backproject,
    kaiser_bessel_transform,
)
from hetero.physics.rotations import random_rotations
from tests.physics.conftest import gaussian_blobs


def analytic_blob_projections(size: int, r0, sigma: float, rotations: torch.Tensor) -> torch.Tensor:
    """Exact projections of a unit-peak Gaussian at ``r0``: 2-D Gaussians at ``(A r0)[:2]``
    with line integral ``sqrt(2 pi) sigma``."""
    centre = (rotations @ torch.tensor(r0, dtype=rotations.dtype))[:, :2]
    axis = torch.arange(size, dtype=rotations.dtype) - size // 2
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    d2 = (xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2
    return math.sqrt(2 * math.pi) * sigma * torch.exp(-d2 / (2 * sigma**2))


def test_toy_reconstruction_from_cryodrgn_projections(toy_data):
    rec = backproject(toy_data.projections, toy_data.rotations.double(), pad_factor=2)
    assert rec.shape == (30, 30, 30)
    curve = fsc(rec, toy_data.volume)
    assert curve.shape == (16,)
    assert torch.all(curve[: 30 // 4 + 1] >= 0.9)  # required: to half Nyquist
    assert torch.all(curve[:15] >= 0.98)  # observed: up to shell 14 of 15


def test_toy_reconstruction_with_transposed_rotations_fails(toy_data):
    """The FSC criterion above discriminates between the conventions."""
    a = toy_data.rotations[:300].double().transpose(-1, -2)
    rec = backproject(toy_data.projections[:300], a, pad_factor=2)
    assert fsc(rec, toy_data.volume)[3:10].mean() < 0.5


@pytest.mark.parametrize("r0", [(0.0, 0.0, 0.0), (7.0, 0.0, 0.0), (0.0, -5.0, 6.0), (4.0, 4.0, -4.0)])
def test_reconstruction_amplitude_is_right_off_centre(r0, blob_volume):
    """Voxel values are recovered wherever the density sits: the reconstruction divides out the
    sinc^2 roll-off of trilinear gridding (without it a blob 7 px off-centre in a 24 box came
    back at ~92 % of its height)."""
    size, sigma = 24, 1.5
    a = random_rotations(600, generator=torch.Generator().manual_seed(0))
    images = analytic_blob_projections(size, r0, sigma, a)
    rec = backproject(images, a, pad_factor=2)
    x, y, z = (int(c) + size // 2 for c in r0)
    assert rec[z, y, x].item() == pytest.approx(1.0, abs=0.03)
    truth = blob_volume(size, [r0], [sigma])
    slope = (rec * truth).sum() / (truth * truth).sum()
    assert slope.item() == pytest.approx(1.0, abs=0.03)
    # Shells with signal (a sigma = 1.5 blob has ~1e-4 of its power left at shell 7 of 12).
    assert fsc(rec, truth)[1:8].min() > 0.95


@pytest.mark.parametrize("pad_factor", [2, 3])
def test_reconstruction_keeps_the_density_of_an_off_centre_particle(pad_factor):
    """D x D slices sample the padded grid only every ``pad_factor`` voxels; RELION's gridding
    density compensation keeps the particle's density right (normalised gridding of such
    slices lost ~40 % of it). The particle's total density (within 4 sigma, 99.9 % of its
    mass) is within 1.5 % and the background stays below 1.5e-3 of the peak. What is left is a
    faint negative background (a low-frequency error of the interpolated fractional
    frequencies): the whole box sums to 0.87 of the mass at pad 2 and 0.70 at pad 3 here
    (hetero's earlier padded-image backprojection: 1.05 and 1.03).
    RELION 3.1.3's own ``relion_reconstruct`` of the same images gives 0.958 within 4 sigma and
    a background 5x deeper (mean -4.6e-3 of the peak beyond radius 11)."""
    size, sigma, r0 = 24, 1.5, (7.0, 0.0, 0.0)
    a = random_rotations(600, generator=torch.Generator().manual_seed(0))
    images = analytic_blob_projections(size, r0, sigma, a)
    rec = backproject(images, a, pad_factor=pad_factor)
    total = (2 * math.pi * sigma**2) ** 1.5
    axis = torch.arange(size, dtype=torch.float64) - size // 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    near = (x - r0[0]) ** 2 + (y - r0[1]) ** 2 + (z - r0[2]) ** 2 < (4 * sigma) ** 2
    assert rec[near].sum().item() == pytest.approx(total, rel=0.015)
    assert abs(rec[~near].mean().item()) < 1.5e-3 * rec.max().item()
    assert rec.sum().item() == pytest.approx(total, rel=0.35 if pad_factor == 3 else 0.15)


def _gaussian_volume(size: int) -> torch.Tensor:
    """The six blobs of the RELION fixture's ``vol.mrc``, scaled from box 64 to ``size``."""
    f = size / 64
    centres = [(9, 0, 0), (0, 13, 2), (-4, -6, 11), (-11, 5, -6), (3, -10, -8), (5, 6, -3)]
    return gaussian_blobs(
        size, [tuple(c * f for c in xyz) for xyz in centres], [s * f for s in (3, 2, 4, 2.5, 1.6, 1.2)],
        [1.0, 1.5, 0.7, 1.2, 2.0, 2.5],
    )


def test_high_defocus_reconstruction_keeps_high_resolution():
    """The data model of RELION and of ``Renderer``: the CTF multiplies the D x D slice. At
    8,000-25,000 Å defocus in a 64 Å box the CTF oscillates about once per Fourier pixel near
    Nyquist; a reconstructor that evaluates it on a padded grid (hetero before: FSC 0.87 /
    0.70 / 0.33 at shells 12 / 14 / 16 here) no longer matches the data there. With the CTF
    on the image grid: 1.000 / 0.997 / 0.94."""
    size, apix, n = 32, 2.0, 1000
    vol = _gaussian_volume(size)
    g = torch.Generator().manual_seed(0)
    a = random_rotations(n, generator=g)
    du = 8000 + 17000 * torch.rand(n, generator=g, dtype=torch.float64)
    params = torch.zeros(n, 9, dtype=torch.float64)
    params[:, 0], params[:, 1] = du, du - 3000 * torch.rand(n, generator=g, dtype=torch.float64)
    params[:, 2] = 360 * torch.rand(n, generator=g, dtype=torch.float64)
    params[:, 3:6] = torch.tensor([300.0, 2.7, 0.1], dtype=torch.float64)
    params[:, 8] = 1.0
    shifts = (torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.5) * 6
    apixes = torch.full((n,), apix, dtype=torch.float64)
    clean = Renderer(size, size)(vol.float(), a.float(), params.float(), apixes.float())
    images = shift_images(clean.double(), shifts)
    acc = BackprojectionAccumulator(size)
    acc.add(images, a, shifts_px=shifts, ctf=ctf_table_compute(params, acc.ctf_size, apixes))
    curve = fsc(acc.reconstruct(), vol)
    assert curve[1:14].min() > 0.99
    assert curve[14:16].min() > 0.98
    assert curve[16] > 0.9


def test_ctf_weighted_wiener_reconstruction(blob_volume):
    """Images made as RELION's ``relion_project`` and ``Renderer`` make them (the CTF on the
    image grid, then the translation), reconstructed with the CTF on the same grid."""
    size, apix, n = 24, 3.0, 600
    g = torch.Generator().manual_seed(1)
    vol = blob_volume(
        size, [(0, 0, 0), (5, -3, 2), (-4, 4, -5), (2, 6, 4)], [2.0, 1.5, 1.2, 1.0], [1.0, 0.7, 0.5, 0.9],
        dtype=torch.float32,
    )
    a = random_rotations(n, generator=g)
    df = 5000 + 5000 * torch.rand(n, generator=g, dtype=torch.float64)
    ctf = compute_ctf(size, apix, df, df + 400, 360 * torch.rand(n, generator=g), 300.0, 2.7, 0.1)
    shifts = (torch.rand(n, 2, generator=g) - 0.5) * 4
    images = render(vol, a.float(), shifts_px=shifts, ctf=ctf.float())

    rec = backproject(images, a, shifts_px=shifts, ctf=ctf, wiener_snr=100.0)
    curve = fsc(rec, vol)
    assert curve[1:11].min() > 0.95  # 10 of the 12 shells (measured >= 0.963; 11: 0.84)
    assert curve[1:10].min() > 0.98
    assert (rec * vol).sum() / (vol * vol).sum() == pytest.approx(1.0, abs=0.1)

    # Each ingredient matters: ignoring the CTF or the shifts ruins the map.
    assert fsc(backproject(images, a, shifts_px=shifts, ctf=None), vol)[1:10].min() < 0.5
    assert fsc(backproject(images, a, ctf=ctf, wiener_snr=100.0), vol)[4:11].mean() < 0.8
    padded = compute_ctf(2 * size, apix, df, df + 400, 0.0, 300.0, 2.7, 0.1)
    with pytest.raises(ValueError, match=r"\(24, 24\) image grid.*acc.ctf_size"):
        backproject(images, a, ctf=padded)


def test_wiener_regulariser_shrinks_and_inf_is_plain_division():
    size = 16
    a = random_rotations(200, generator=torch.Generator().manual_seed(2))
    images = analytic_blob_projections(size, (2.0, -1.0, 0.0), 1.5, a)
    acc = BackprojectionAccumulator(size)
    acc.add(images, a)
    plain = acc.reconstruct()
    torch.testing.assert_close(acc.reconstruct(wiener_snr=1e12), plain, atol=1e-6, rtol=0)
    assert acc.reconstruct(wiener_snr=0.1).norm() < 0.9 * plain.norm()
    # A CTF of ones is no CTF.
    acc_ones = BackprojectionAccumulator(size)
    acc_ones.add(images, a, ctf=torch.ones(200, size, size))
    torch.testing.assert_close(acc_ones.reconstruct(), plain)


def test_shifts_are_undone_on_insertion():
    size = 20
    g = torch.Generator().manual_seed(3)
    a = random_rotations(300, generator=g)
    images = analytic_blob_projections(size, (1.0, 2.0, -1.0), 1.5, a)
    shifts = (torch.rand(300, 2, generator=g, dtype=torch.float64) - 0.5) * 5
    moved = analytic_blob_projections(size, (1.0, 2.0, -1.0), 1.5, a)
    centre = (a @ torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64))[:, :2] + shifts
    axis = torch.arange(size, dtype=torch.float64) - size // 2
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    moved = math.sqrt(2 * math.pi) * 1.5 * torch.exp(
        -((xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2) / (2 * 1.5**2)
    )
    ref = backproject(images, a)
    torch.testing.assert_close(backproject(moved, a, shifts_px=shifts), ref, atol=2e-3, rtol=0)


def test_accumulator_batches_and_half_map_merge_equal_one_accumulator(toy_data):
    imgs, a = toy_data.projections[:400], toy_data.rotations[:400].double()
    one = BackprojectionAccumulator(30)
    one.add(imgs, a)
    half1, half2 = BackprojectionAccumulator(30), BackprojectionAccumulator(30)
    for start in range(0, 400, 100):  # interleaved odd/even batches as for half maps
        (half1 if (start // 100) % 2 == 0 else half2).add(imgs[start : start + 100], a[start : start + 100])
    assert half1.count == half2.count == 200
    half1.merge(half2)
    assert half1.count == one.count == 400
    torch.testing.assert_close(half1.numerator, one.numerator, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(half1.weight, one.weight, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(half1.reconstruct(), one.reconstruct(), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(one.reconstruct(), backproject(imgs, a), atol=1e-12, rtol=0)


def test_kaiser_bessel_transform_matches_numerical_integration():
    """The blob's 3-D transform (RELION's ``kaiser_Fourier_value``, order 0) against a radial
    quadrature of the blob ``I0(alpha sqrt(1 - (r/a)^2)) / I0(alpha)`` itself."""
    a, alpha = 3.8, 15.0
    r = torch.linspace(0, a, 20001, dtype=torch.float64)
    blob = torch.special.i0(alpha * torch.sqrt((1 - (r / a) ** 2).clamp(min=0))) / torch.special.i0(
        torch.tensor(alpha, dtype=torch.float64)
    )
    w = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.4, 0.7], dtype=torch.float64)
    kr = 2 * math.pi * w[:, None] * r[None]
    sinc = torch.where(kr > 0, torch.sin(kr) / kr.clamp(min=1e-300), torch.ones_like(kr))
    integral = torch.trapezoid(4 * math.pi * r**2 * blob * sinc, r, dim=-1)
    expected = integral / integral[0]
    torch.testing.assert_close(kaiser_bessel_transform(w, a, alpha), expected, atol=1e-6, rtol=1e-5)
