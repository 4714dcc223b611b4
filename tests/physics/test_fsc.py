"""Fourier shell correlation: shells ``round(|k|)``, ``k = 0 .. D/2``; crossing interpolation;
resolution of shell ``k`` is ``D * apix / k`` Å; CryoBench's AUC."""

from __future__ import annotations

import math

import pytest
import torch

from hetero.physics.fourier import fft3_centered, ifft3_centered, radius_grid
from hetero.physics.fsc import fsc, fsc_auc, fsc_crossing, fsc_resolution, shell_resolution_angstrom


def _noise(size: int, seed: int, n: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (size,) * 3 if n is None else (n,) + (size,) * 3
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_identical_maps_give_one_everywhere():
    v = _noise(32, 0)
    curve = fsc(v, v)
    assert curve.shape == (17,) and curve.dtype == torch.float32
    torch.testing.assert_close(curve, torch.ones(17), atol=1e-6, rtol=0)
    torch.testing.assert_close(fsc(v, 2.5 * v), torch.ones(17), atol=1e-6, rtol=0)
    torch.testing.assert_close(fsc(v, -v), -torch.ones(17), atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [64, 32, 30])
def test_fsc_auc_of_identical_maps(size):
    ones = torch.ones(size // 2 + 1)
    expected = (size / 2 - 1) / size
    if size in (64, 32):  # k / D exact in binary: the trapezoid sum is exact
        assert fsc_auc(ones, size) == expected
    else:
        assert fsc_auc(ones, size) == pytest.approx(expected, rel=1e-14)
    v = _noise(size, 1)
    assert fsc_auc(fsc(v, v), size) == pytest.approx(expected, abs=1e-6)


def test_fsc_auc_definition():
    size = 32
    # FSC[0] is replaced by 1 and |FSC| is integrated over shells 0 .. D/2 - 1 (k / D).
    step = torch.zeros(17)
    step[:6] = 1.0  # 1 up to shell 5, 0 from shell 6 on
    assert fsc_auc(step, size) == pytest.approx(5.5 / size, abs=1e-12)
    step[0] = -0.3
    assert fsc_auc(step, size) == pytest.approx(5.5 / size, abs=1e-12)
    assert fsc_auc(-torch.ones(17), size) == pytest.approx(15 / 32, abs=1e-12)
    step[16] = 1.0  # the Nyquist shell is not integrated
    assert fsc_auc(step, size) == pytest.approx(5.5 / size, abs=1e-12)


def test_independent_noise_gives_about_zero():
    size = 32
    a, b = _noise(size, 2), _noise(size, 3)
    curve = fsc(a, b)
    shells = torch.round(radius_grid((size,) * 3)).long().flatten()
    counts = torch.bincount(shells, minlength=size // 2 + 1)[: size // 2 + 1].double()
    # Each shell's FSC is a correlation of ~N_k/2 independent complex pairs: std ~ 1/sqrt(N_k).
    z = curve[2:].double() * counts[2:].sqrt()
    assert z.abs().max() < 5
    assert curve[2:].mean().abs() < 0.02


def test_shells_are_rounded_frequency_radius():
    """Flip the sign of every Fourier component with round(|k|) > 6: the FSC is +1 up to shell
    6 and -1 beyond, which pins the shell assignment round(|k|)."""
    size, cut = 24, 6
    v = _noise(size, 4)
    low = torch.round(radius_grid((size,) * 3, dtype=torch.float64)) <= cut
    flipped = ifft3_centered(fft3_centered(v) * (2.0 * low - 1.0)).real
    curve = fsc(v, flipped)
    torch.testing.assert_close(curve[: cut + 1], torch.ones(cut + 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(curve[cut + 1 :], -torch.ones(size // 2 - cut), atol=1e-6, rtol=0)


def test_fsc_is_batched_and_masked():
    a, b = _noise(16, 5, n=3), _noise(16, 6, n=3)
    b = 0.6 * a + b
    curves = fsc(a, b)
    assert curves.shape == (3, 9)
    for i in range(3):
        torch.testing.assert_close(curves[i], fsc(a[i], b[i]))
    mask = (radius_grid((16,) * 3, dtype=torch.float64) < 6).double()
    torch.testing.assert_close(fsc(a[0], b[0], mask=mask), fsc(a[0] * mask, b[0] * mask))
    assert not torch.allclose(fsc(a[0], b[0], mask=mask), curves[0])


def test_fsc_crossing_interpolates_linearly():
    curve = torch.tensor([1.0, 0.9, 0.7, 0.3, 0.1])
    assert fsc_crossing(curve, 0.5) == pytest.approx(2.5)
    assert fsc_crossing(curve, 0.143) == pytest.approx(3 + (0.3 - 0.143) / (0.3 - 0.1))
    assert fsc_crossing(torch.tensor([1.0, 0.2, 0.1]), 0.5) == pytest.approx(0.625)
    # Shell 0 does not count, the *first* crossing does (even if the curve recovers).
    assert fsc_crossing(torch.tensor([0.1, 0.9, 0.8, 0.2]), 0.5) == pytest.approx(2.5)
    assert fsc_crossing(torch.tensor([1.0, 0.9, 0.4, 0.8, 0.1]), 0.5) == pytest.approx(1.8)
    # Never crosses: the last shell (Nyquist).
    assert fsc_crossing(torch.ones(17), 0.143) == 16.0


def test_fsc_resolution():
    curve = torch.tensor([1.0, 0.9, 0.7, 0.3, 0.1])
    assert fsc_resolution(curve, 64, 1.5, threshold=0.5) == pytest.approx(64 * 1.5 / 2.5)
    assert fsc_resolution(torch.ones(33), 64, 1.5) == pytest.approx(3.0)  # Nyquist = 2 apix
    assert fsc_resolution(torch.tensor([1.0, 0.0, 0.0]), 4, 1.0, threshold=0.5) == pytest.approx(4 / 0.5)


def test_shell_resolution_angstrom():
    res = shell_resolution_angstrom(64, 1.5)
    assert res.shape == (33,)
    assert math.isinf(res[0].item())
    expected = torch.tensor([96.0 / k for k in range(1, 33)])
    torch.testing.assert_close(res[1:], expected)
    assert res[1].item() == pytest.approx(96.0) and res[32].item() == pytest.approx(3.0)
    assert res[16].item() == pytest.approx(6.0)
