"""Centred FFTs, Fourier cropping/padding, sub-pixel shifts and radial shells.

Conventions pinned here: the zero frequency and the real-space origin both sit at index
``D // 2`` (even and odd D); forward transforms are unnormalised (DC = sum); Fourier
cropping/padding keeps the physical extent and the *pixel-value* scale (a constant image keeps
its value, the image sum scales with the number of pixels, i.e. by ``(d / D)^2``);
``shift_images(img, t)(r) = img(r - t)``.
"""

from __future__ import annotations

import math

import pytest
import torch

from hetero.physics.fourier import (
    fft2_centered,
    fft3_centered,
    fourier_crop_2d,
    fourier_crop_3d,
    frequency_grid_2d,
    gaussian_envelope,
    ifft2_centered,
    ifft3_centered,
    phase_ramp_2d,
    radial_average,
    radius_grid,
    shift_images,
)


def band_limited_images(n: int, size: int, k_max: int, seed: int = 0) -> torch.Tensor:
    """Real ``(n, D, D)`` images whose spectra vanish for ``|kx|`` or ``|ky| > k_max``."""
    g = torch.Generator().manual_seed(seed)
    spec = torch.zeros(n, size, size, dtype=torch.complex128)
    c = size // 2
    block = torch.randn(n, 2 * k_max + 1, 2 * k_max + 1, 2, generator=g, dtype=torch.float64)
    spec[:, c - k_max : c + k_max + 1, c - k_max : c + k_max + 1] = torch.view_as_complex(block)
    # Hermitian symmetrise so that the image is real.
    flipped = torch.flip(spec[:, c - k_max : c + k_max + 1, c - k_max : c + k_max + 1], (-2, -1)).conj()
    spec[:, c - k_max : c + k_max + 1, c - k_max : c + k_max + 1] += flipped
    img = ifft2_centered(spec)
    assert img.imag.abs().max() < 1e-10
    return img.real


@pytest.mark.parametrize("size", [16, 17])
def test_fft2_round_trip_and_unnormalised(size):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, size, size, generator=g, dtype=torch.float64)
    f = fft2_centered(x)
    torch.testing.assert_close(ifft2_centered(f).real, x)
    torch.testing.assert_close(f[..., size // 2, size // 2].real, x.sum((-2, -1)))


@pytest.mark.parametrize("size", [8, 9])
def test_fft3_round_trip_and_unnormalised(size):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, size, size, size, generator=g, dtype=torch.float64)
    f = fft3_centered(x)
    torch.testing.assert_close(ifft3_centered(f).real, x)
    c = size // 2
    torch.testing.assert_close(f[..., c, c, c].real, x.sum((-3, -2, -1)))


@pytest.mark.parametrize("size", [16, 15])
def test_origin_is_at_index_d_over_2(size):
    """A delta at the centre pixel D//2 has a flat, real spectrum; one pixel to the right
    (+x, last index) gives the phase ramp exp(-2 pi i kx / D)."""
    c = size // 2
    delta = torch.zeros(size, size, dtype=torch.float64)
    delta[c, c] = 1.0
    torch.testing.assert_close(fft2_centered(delta), torch.ones(size, size, dtype=torch.complex128))
    moved = torch.zeros_like(delta)
    moved[c, c + 1] = 1.0
    k = torch.arange(size, dtype=torch.float64) - c
    expected = torch.exp(-2j * math.pi * k / size).expand(size, size)
    torch.testing.assert_close(fft2_centered(moved), expected)


def test_frequency_grid():
    sx, sy = frequency_grid_2d(8, 2.0, dtype=torch.float64)
    assert sx[4, 4] == 0 and sy[4, 4] == 0
    assert sx[4, 5].item() == pytest.approx(1 / 16) and sy[4, 5] == 0  # x along the last axis
    assert sy[0, 4].item() == pytest.approx(-0.25)  # Nyquist of 2 Å pixels, at index 0


def test_half_precision_is_upcast():
    x = torch.randn(4, 16, 16).to(torch.bfloat16)
    assert fft2_centered(x).dtype == torch.complex64
    assert fft3_centered(torch.randn(8, 8, 8).half()).dtype == torch.complex64


# ------------------------------------------------------------------------------------------
# Cropping and padding
# ------------------------------------------------------------------------------------------


def test_fourier_crop_keeps_constant_value_and_mean():
    const = torch.full((2, 64, 64), 3.25, dtype=torch.float64)
    torch.testing.assert_close(fourier_crop_2d(const, 32), torch.full((2, 32, 32), 3.25, dtype=torch.float64))
    torch.testing.assert_close(fourier_crop_2d(const, 96), torch.full((2, 96, 96), 3.25, dtype=torch.float64))
    x = torch.randn(3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    small = fourier_crop_2d(x, 40)
    torch.testing.assert_close(small.mean((-2, -1)), x.mean((-2, -1)))
    # The sum (integrated density) scales with the pixel count: (d / D)^2.
    torch.testing.assert_close(small.sum((-2, -1)), x.sum((-2, -1)) * (40 / 64) ** 2)


def test_fourier_crop_of_band_limited_image_is_subsampling():
    """Same physical extent, centre at D//2: cropping 64 -> 32 samples every second pixel."""
    x = band_limited_images(3, 64, k_max=12, seed=4)
    small = fourier_crop_2d(x, 32)
    torch.testing.assert_close(small, x[..., ::2, ::2], atol=1e-10, rtol=0)
    # Its spectrum is the central part of the original one, times (d / D)^2.
    torch.testing.assert_close(fft2_centered(small), fft2_centered(x)[..., 16:48, 16:48] * 0.25, atol=1e-9, rtol=0)


@pytest.mark.parametrize(("size", "small"), [(64, 32), (64, 40), (33, 21)])
def test_fourier_crop_then_pad_preserves_low_frequencies(size, small):
    x = band_limited_images(2, size, k_max=small // 2 - 2, seed=5)
    back = fourier_crop_2d(fourier_crop_2d(x, small), size)
    torch.testing.assert_close(back, x, atol=1e-10, rtol=0)


def test_fourier_pad_is_interpolation():
    x = band_limited_images(1, 32, k_max=10, seed=6)
    big = fourier_crop_2d(x, 64)
    torch.testing.assert_close(big[..., ::2, ::2], x, atol=1e-10, rtol=0)


def test_fourier_crop_3d():
    g = torch.Generator().manual_seed(7)
    spec = torch.zeros(32, 32, 32, dtype=torch.complex128)
    block = torch.randn(11, 11, 11, 2, generator=g, dtype=torch.float64)
    spec[11:22, 11:22, 11:22] = torch.view_as_complex(block)
    spec = spec + torch.flip(spec, (0, 1, 2)).conj().roll((1, 1, 1), (0, 1, 2))  # Hermitian about index 16
    vol = ifft3_centered(spec)
    assert vol.imag.abs().max() < 1e-10
    vol = vol.real
    small = fourier_crop_3d(vol, 16)
    torch.testing.assert_close(small, vol[::2, ::2, ::2], atol=1e-10, rtol=0)
    torch.testing.assert_close(fourier_crop_3d(small, 32), vol, atol=1e-10, rtol=0)
    const = torch.full((16, 16, 16), -2.0, dtype=torch.float64)
    torch.testing.assert_close(fourier_crop_3d(const, 8), torch.full((8, 8, 8), -2.0, dtype=torch.float64))


# ------------------------------------------------------------------------------------------
# Shifts
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 15])
@pytest.mark.parametrize(("tx", "ty"), [(3, -2), (-5, 7), (0, 1)])
def test_integer_shift_equals_roll(size, tx, ty):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, size, size, generator=g, dtype=torch.float64)
    shifts = torch.tensor([[tx, ty], [tx, ty]], dtype=torch.float64)
    out = shift_images(x, shifts)
    torch.testing.assert_close(out, torch.roll(x, shifts=(ty, tx), dims=(-2, -1)), atol=1e-10, rtol=0)


def test_positive_tx_moves_content_to_larger_column_index():
    x = torch.zeros(1, 16, 16, dtype=torch.float64)
    x[0, 8, 8] = 1.0
    out = shift_images(x, torch.tensor([[2.0, 0.0]], dtype=torch.float64))
    assert out[0].argmax().item() == 8 * 16 + 10


def test_subpixel_shift_matches_analytic_translation():
    """For a band-limited (sum of cosines) image, out(r) = in(r - t) exactly."""
    size = 32
    axis = torch.arange(size, dtype=torch.float64) - size // 2
    y, x = torch.meshgrid(axis, axis, indexing="ij")

    def f(xx, yy):
        return (
            torch.cos(2 * math.pi * (3 * xx - 2 * yy) / size + 0.3)
            + 0.5 * torch.sin(2 * math.pi * (5 * xx + 7 * yy) / size)
            + 0.2
        )

    t = torch.tensor([[1.37, -2.61]], dtype=torch.float64)
    out = shift_images(f(x, y)[None], t)
    torch.testing.assert_close(out[0], f(x - t[0, 0], y - t[0, 1]), atol=1e-10, rtol=0)


def test_subpixel_shift_then_inverse_is_identity():
    x = band_limited_images(4, 32, k_max=14, seed=9)
    g = torch.Generator().manual_seed(10)
    t = (torch.rand(4, 2, generator=g, dtype=torch.float64) - 0.5) * 7
    back = shift_images(shift_images(x, t), -t)
    torch.testing.assert_close(back, x, atol=1e-10, rtol=0)
    ramp = phase_ramp_2d(t, 32)
    torch.testing.assert_close(ramp.abs(), torch.ones(4, 32, 32, dtype=torch.float64))


# ------------------------------------------------------------------------------------------
# Radial shells
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_radial_average_of_shell_function_is_exact(ndim):
    size = 16 if ndim == 3 else 32
    r = radius_grid((size,) * ndim, dtype=torch.float64)
    shells = torch.round(r)
    values = torch.cos(0.4 * shells) + shells**2  # any function of the shell index
    avg = radial_average(values, ndim=ndim)
    assert avg.shape == (size // 2 + 1,)
    k = torch.arange(size // 2 + 1, dtype=torch.float64)
    torch.testing.assert_close(avg, torch.cos(0.4 * k) + k**2)
    torch.testing.assert_close(radial_average(torch.ones_like(values), ndim=ndim), torch.ones(size // 2 + 1, dtype=torch.float64))


def test_radial_average_of_smooth_radial_function():
    size = 64
    r = radius_grid((size, size), dtype=torch.float64)

    def f(rr):
        return torch.stack([torch.exp(-(rr**2) / (2 * 10.0**2)), 1.0 / (1.0 + rr)])

    avg = radial_average(f(r))
    assert avg.shape == (2, size // 2 + 1)
    shell_radius = radial_average(r)
    k = torch.arange(size // 2 + 1, dtype=torch.float64)
    # Shell k holds the pixels with round(|r|) = k: their mean radius is within 0.5 of k ...
    assert torch.all((shell_radius - k).abs() <= 0.5)
    # ... and the shell average of a smooth radial function is f at that radius up to second
    # order (the radii in a shell spread over a width of 1).
    torch.testing.assert_close(avg, f(shell_radius), atol=5e-3, rtol=0)
    torch.testing.assert_close(avg[:, 3:-1], f(k)[:, 3:-1], atol=0, rtol=3e-2)
    assert avg[0, 0] == 1.0


def test_gaussian_envelope():
    env = gaussian_envelope(32, torch.tensor([0.0, 100.0]), 2.0)
    sx, sy = frequency_grid_2d(32, 2.0)
    assert env.shape == (2, 32, 32)
    torch.testing.assert_close(env[0], torch.ones(32, 32))
    torch.testing.assert_close(env[1], torch.exp(-100.0 * (sx**2 + sy**2) / 4))
