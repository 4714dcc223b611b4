"""Gaussian pseudo-atom renderer: analytic projections, agreement with rasterise-and-project
through the existing projector (with CTF and shifts), exact gradients, chunking, autocast."""

from __future__ import annotations

import math

import pytest
import torch

import hetero.physics.gaussians as G
from hetero.data.synthetic.molecule import project_atoms, rasterize
from hetero.physics.ctf import compute_ctf
from hetero.physics.fourier import shift_images
from hetero.physics.gaussians import project_gaussians, rasterize_gaussians, splat_gaussians
from hetero.physics.projection import project_real, render
from hetero.physics.rotations import random_rotations


def _cloud(n: int, extent: float, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(n, 3, generator=g, dtype=dtype) - 0.5) * extent)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("sigma", [1.6, 2.5, 6.0])
@pytest.mark.parametrize("splat", [None, G.SPLAT_SIGMA_PX])
def test_projection_matches_the_analytic_line_integral(sigma, splat):
    """``project_atoms`` (the synthetic data's exact projector) is the reference."""
    pos = _cloud(150, 40.0)
    amp = torch.rand(150, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    rot = random_rotations(4, torch.Generator().manual_seed(2))
    ref = project_atoms(pos, rot, 48, 2.0, sigma, weights=amp)
    img = project_gaussians(pos, sigma, amp, rot, 48, 2.0, splat_sigma_px=splat)
    # Full-width splat: truncation only (4 sigma, exp(-8)); split widths: + aliasing of the
    # 0.75 px part (all centres at least 3 sigma inside the box: the Fourier filter is periodic).
    assert _rel(img, ref) < (5e-4 if splat is None else 4e-3)


def test_rasterized_map_matches_the_analytic_map():
    pos = _cloud(150, 40.0)
    for sigma in (2.0, 5.0):
        vol = rasterize_gaussians(pos, sigma, torch.ones(150, dtype=torch.float64), 40, 2.0)
        ref = rasterize(pos.numpy(), 40, 2.0, sigma).double()
        assert _rel(vol, ref) < (1e-2 if sigma == 2.0 else 2e-3)  # 1 voxel: 3-D aliasing


def test_renderer_agrees_with_rasterise_and_project_with_ctf_and_shift():
    """The forward model through the voxel path: rasterise on the grid, then the existing
    ``render`` (trilinear real-space projection, CTF, translation)."""
    d, apix, n = 40, 3.0, 300
    pos = _cloud(n, 50.0, dtype=torch.float32)
    sigma = torch.full((n,), 6.0)
    amp = torch.rand(n, generator=torch.Generator().manual_seed(3)) + 0.5
    rot = random_rotations(3, torch.Generator().manual_seed(4)).float()
    shifts = torch.tensor([[1.5, -2.25], [0.0, 0.0], [-3.0, 0.5]])
    ones = torch.ones(3)
    ctf = compute_ctf(d, apix, 12000 * ones, 11000 * ones, 30 * ones, 300.0, 2.7, 0.1)
    vol = rasterize_gaussians(pos, sigma, amp, d, apix)
    ref = render(vol, rot, shifts_px=shifts, ctf=ctf)
    img = project_gaussians(pos, sigma, amp, rot, d, apix, shifts_px=shifts, ctf=ctf)
    # Trilinear rotation smooths the voxel path by ~1 % of the peak at sigma = 2 px (project_real's
    # interpolation error; 8 % at 1 px), which the CTF's high frequencies bring out a little more.
    assert _rel(img, ref) < 0.03
    corr = torch.corrcoef(torch.stack([img.flatten(), ref.flatten()]))[0, 1]
    assert corr > 0.999
    # And without CTF: the plain projector.
    plain = project_gaussians(pos, sigma, amp, rot, d, apix)
    assert _rel(plain, project_real(vol, rot)) < 0.02


def test_shift_moves_the_image_like_the_phase_ramp():
    pos = _cloud(80, 30.0)
    rot = random_rotations(2, torch.Generator().manual_seed(5))
    t = torch.tensor([[2.5, -1.25], [-0.5, 3.0]], dtype=torch.float64)
    img = project_gaussians(pos, 3.0, torch.ones(80, dtype=torch.float64), rot, 48, 1.5)
    moved = project_gaussians(pos, 3.0, torch.ones(80, dtype=torch.float64), rot, 48, 1.5, shifts_px=t)
    assert _rel(moved, shift_images(img, t)) < 1e-3


@pytest.mark.parametrize("splat", [None, G.SPLAT_SIGMA_PX])
def test_position_gradients_match_finite_differences(splat):
    g = torch.Generator().manual_seed(6)
    pos = ((torch.rand(2, 6, 3, generator=g, dtype=torch.float64) - 0.5) * 12).requires_grad_()
    sigma = torch.rand(6, generator=g, dtype=torch.float64) + 1.6
    amp = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    rot = random_rotations(2, g)
    ctf = compute_ctf(20, 1.5, torch.tensor([9000.0, 15000.0]), torch.tensor([8000.0, 14000.0]),
                      torch.tensor([10.0, 80.0]), 300.0, 2.7, 0.1, dtype=torch.float64)

    def f(p):
        return project_gaussians(p, sigma, amp, rot, 20, 1.5, ctf=ctf, splat_sigma_px=splat)

    assert torch.autograd.gradcheck(f, (pos,), eps=1e-6, atol=1e-7, rtol=1e-4, fast_mode=True)


def test_width_and_amplitude_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(7)
    pos = (torch.rand(5, 3, generator=g, dtype=torch.float64) - 0.5) * 10
    sigma = (torch.rand(5, generator=g, dtype=torch.float64) + 2.0).requires_grad_()
    amp = (torch.rand(5, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    rot = random_rotations(2, g)
    assert torch.autograd.gradcheck(
        lambda s, a: project_gaussians(pos, s, a, rot, 16, 1.5, splat_sigma_px=None),
        (sigma, amp), eps=1e-6, atol=1e-7, fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda s, a: rasterize_gaussians(pos, s, a, 16, 1.5, splat_sigma_px=None),
        (sigma, amp), eps=1e-6, atol=1e-7, fast_mode=True)


def test_chunked_splat_equals_one_chunk(monkeypatch):
    """Memory is bounded by processing Gaussians in chunks: the result and gradients must not
    depend on the chunk size."""
    g = torch.Generator().manual_seed(8)
    coords = ((torch.rand(3, 50, 2, generator=g) - 0.5) * 20).requires_grad_()
    w = torch.rand(3, 50, generator=g).requires_grad_()
    full = splat_gaussians(coords, 1.2, w, 24)
    full.pow(2).sum().backward()
    grads = coords.grad.clone(), w.grad.clone()
    coords.grad = w.grad = None
    monkeypatch.setattr(G, "CHUNK_ELEMENTS", 7)
    small = splat_gaussians(coords, 1.2, w, 24)
    small.pow(2).sum().backward()
    torch.testing.assert_close(small, full)
    torch.testing.assert_close(coords.grad, grads[0])
    torch.testing.assert_close(w.grad, grads[1])
    # A normalised Gaussian well inside the grid integrates to its weight.
    one = splat_gaussians(torch.zeros(1, 1, 2), 1.5, torch.ones(1, 1), 24)
    assert float(one.sum()) == pytest.approx(1.0, abs=5e-4)


def test_runs_in_float32_inside_autocast():
    pos = _cloud(60, 30.0, dtype=torch.float32)
    rot = random_rotations(2, torch.Generator().manual_seed(9)).float()
    ref = project_gaussians(pos, 3.0, torch.ones(60), rot, 32, 1.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img = project_gaussians(pos.bfloat16(), 3.0, torch.ones(60).bfloat16(), rot.bfloat16(), 32, 1.5)
    assert img.dtype == torch.float32
    # Only the bf16 rounding of the inputs differs (positions to ~0.4 %, i.e. ~0.06 px).
    assert _rel(img, ref) < 0.05
    assert math.isfinite(float(img.sum()))
