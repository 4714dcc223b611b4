"""Centred Fourier transforms, Fourier cropping/padding, sub-pixel shifts and radial shells.

Conventions (see :mod:`hetero.physics.conventions`): the zero frequency and the real-space
origin both sit at index ``D // 2``; forward transforms are unnormalised. All transforms
upcast half-precision inputs to float32 (FFTs in bf16/fp16 are inaccurate or unsupported),
so they are safe inside ``torch.autocast`` regions.

Example usage::

    f = fft2_centered(images)                 # (B, D, D) complex
    small = fourier_crop_2d(images, 64)       # (B, 64, 64) real, same physical extent
    moved = shift_images(images, shifts_px)   # out(r) = in(r - t)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _upcast(x: Tensor) -> Tensor:
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    if x.dtype in (torch.complex32,):
        return x.to(torch.complex64)
    return x


def fft2_centered(images: Tensor) -> Tensor:
    """Centred 2-D FFT over the last two axes: ``fftshift(fft2(ifftshift(x)))``."""
    x = _upcast(images)
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1))), dim=(-2, -1))


def ifft2_centered(spectra: Tensor) -> Tensor:
    """Inverse of :func:`fft2_centered` (complex output; take ``.real`` for real signals)."""
    x = _upcast(spectra)
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(x, dim=(-2, -1))), dim=(-2, -1))


def fft3_centered(volumes: Tensor) -> Tensor:
    """Centred 3-D FFT over the last three axes."""
    x = _upcast(volumes)
    dims = (-3, -2, -1)
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=dims), dim=dims), dim=dims)


def ifft3_centered(spectra: Tensor) -> Tensor:
    """Inverse of :func:`fft3_centered` (complex output)."""
    x = _upcast(spectra)
    dims = (-3, -2, -1)
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(x, dim=dims), dim=dims), dim=dims)


def frequency_grid_2d(
    box_size: int, pixel_size_angstrom: float = 1.0, device=None, dtype=torch.float32
) -> tuple[Tensor, Tensor]:
    """Centred spatial-frequency grids ``(sx, sy)``, each ``(D, D)``, in cycles/Å.

    With ``pixel_size_angstrom=1`` the values are cycles/pixel (Nyquist = 0.5).
    """
    k = (torch.arange(box_size, device=device, dtype=dtype) - box_size // 2) / (
        box_size * pixel_size_angstrom
    )
    sy, sx = torch.meshgrid(k, k, indexing="ij")
    return sx, sy


def radius_grid(shape: tuple[int, ...], device=None, dtype=torch.float32) -> Tensor:
    """Distance in pixels from the centre ``D // 2`` for a 2-D or 3-D grid of the given shape."""
    axes = [torch.arange(n, device=device, dtype=dtype) - n // 2 for n in shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.sqrt(sum(g**2 for g in grids))


def fourier_crop_2d(images: Tensor, new_size: int) -> Tensor:
    """Resample ``(..., D, D)`` real images to ``(..., d, d)`` by Fourier cropping (d <= D) or
    zero-padding (d > D), keeping the physical extent: the pixel size becomes ``apix * D / d``.

    Fourier amplitudes are scaled by ``(d / D)^2`` (undoing the change of FFT normalisation), so
    pixel *values* keep their scale: a constant image keeps its value, the image mean is
    unchanged and the image sum scales by ``(d / D)^2``. For a band-limited image, cropping
    ``D -> D/2`` returns exactly every second pixel (``img[..., ::2, ::2]``).
    """
    size = images.shape[-1]
    if new_size == size:
        return images
    f = fft2_centered(images)
    if new_size < size:
        start = size // 2 - new_size // 2
        f = f[..., start : start + new_size, start : start + new_size]
    else:
        pad = new_size // 2 - size // 2
        out = f.new_zeros(*f.shape[:-2], new_size, new_size)
        out[..., pad : pad + size, pad : pad + size] = f
        f = out
    scale = (new_size / size) ** 2
    return ifft2_centered(f).real * scale


def fourier_crop_3d(volumes: Tensor, new_size: int) -> Tensor:
    """3-D analogue of :func:`fourier_crop_2d` for ``(..., D, D, D)`` volumes.

    Voxel values are kept on the same density scale (scaled by ``(d / D)^3`` in Fourier space
    to undo the change of FFT normalisation).
    """
    size = volumes.shape[-1]
    if new_size == size:
        return volumes
    f = fft3_centered(volumes)
    if new_size < size:
        s = size // 2 - new_size // 2
        f = f[..., s : s + new_size, s : s + new_size, s : s + new_size]
    else:
        p = new_size // 2 - size // 2
        out = f.new_zeros(*f.shape[:-3], new_size, new_size, new_size)
        out[..., p : p + size, p : p + size, p : p + size] = f
        f = out
    return ifft3_centered(f).real * (new_size / size) ** 3


def phase_ramp_2d(shifts_px: Tensor, box_size: int) -> Tensor:
    """Fourier multipliers that translate images by ``shifts_px`` ``(..., 2)`` = (tx, ty) pixels.

    ``ifft(fft(img) * ramp)(r) = img(r - t)``. Returns ``(..., D, D)`` complex.
    """
    shifts = _upcast(shifts_px)
    sx, sy = frequency_grid_2d(box_size, 1.0, device=shifts.device, dtype=shifts.dtype)
    phase = -2 * math.pi * (sx * shifts[..., 0, None, None] + sy * shifts[..., 1, None, None])
    return torch.polar(torch.ones_like(phase), phase)


def shift_images(images: Tensor, shifts_px: Tensor) -> Tensor:
    """Translate ``(..., D, D)`` images by sub-pixel ``shifts_px`` ``(..., 2)`` (periodic).

    ``out(r) = in(r - t)``: positive ``tx`` moves content towards larger x (column) index.
    """
    f = fft2_centered(images) * phase_ramp_2d(shifts_px, images.shape[-1])
    return ifft2_centered(f).real


def radial_shell_index(shape: tuple[int, ...], device=None) -> Tensor:
    """Integer shell index ``round(|k|)`` of every element of a centred 2-D or 3-D spectrum."""
    return torch.round(radius_grid(shape, device=device, dtype=torch.float32)).long()


def radial_average(values: Tensor, ndim: int = 2, n_shells: int | None = None) -> Tensor:
    """Mean of a centred spectrum over integer shells ``round(|k|)``.

    :param values: ``(..., D, D)`` (``ndim=2``) or ``(..., D, D, D)`` (``ndim=3``) real tensor.
    :return: ``(..., n_shells)``, ``n_shells = D // 2 + 1`` by default (shell D/2 = Nyquist).
    """
    size = values.shape[-1]
    shape = tuple(values.shape[-ndim:])
    idx = radial_shell_index(shape, device=values.device).flatten()
    n = n_shells or size // 2 + 1
    keep = idx < n
    flat = values.reshape(*values.shape[:-ndim], -1)[..., keep]
    idx = idx[keep]
    sums = flat.new_zeros(*flat.shape[:-1], n).index_add_(-1, idx, flat)
    counts = torch.bincount(idx, minlength=n).to(flat.dtype).clamp(min=1)
    return sums / counts


def gaussian_envelope(box_size: int, b_factor: Tensor | float, pixel_size_angstrom: float, device=None) -> Tensor:
    """``exp(-B s^2 / 4)`` on a centred ``(D, D)`` grid, s in 1/Å (RELION's B-factor form).

    ``b_factor`` may be a tensor ``(B,)``, giving ``(B, D, D)``.
    """
    sx, sy = frequency_grid_2d(box_size, pixel_size_angstrom, device=device)
    s2 = sx**2 + sy**2
    b = torch.as_tensor(b_factor, dtype=torch.float32, device=device)
    return torch.exp(-b[..., None, None] * s2 / 4.0)


def randomise_phases_beyond(
    volume: Tensor, shell: float, generator: torch.Generator | None = None
) -> Tensor:
    """Replace the Fourier phases of ``volume`` at ``|k| >= shell`` by uniform random phases,
    keeping every amplitude (RELION's ``randomizePhasesBeyond``, used by ``relion_postprocess``
    for the FSC correction of Chen et al. 2013, Ultramicroscopy 135:24).

    Each Fourier component ``F(k)`` beyond the cut becomes ``F(k) exp(i (t(k) - t(-k)))`` with
    ``t`` i.i.d. uniform on ``[0, 2 pi)``: the added phase is uniform and odd in ``k``, so the
    spectrum stays Hermitian, the map stays real and ``|F(k)|`` is kept exactly (the few
    self-conjugate components, e.g. the Nyquist corners, are real and keep their value). RELION
    instead draws a phase per element of its half-complex transform and lets the inverse FFT
    symmetrise the ``kx = 0`` and Nyquist planes, which slightly changes their amplitudes.

    :param volume: ``(..., D, D, D)`` real; half precision is upcast to float32, float64 kept.
    :param shell: cut in Fourier pixels (``|k| = D * apix / resolution``); components with
        ``|k| >= shell`` are randomised (RELION's ``kp^2 + ip^2 + jp^2 >= index^2``), so integer
        shells ``round(|k|) < shell`` are untouched.
    :param generator: ``torch.Generator`` for the phases (default: torch's global one); the
        phases are drawn on the generator's device, so a seeded CPU generator gives the same
        map on CPU and CUDA.
    :return: ``(..., D, D, D)`` real tensor of ``volume``'s (upcast) dtype and device.
    """
    x = _upcast(volume)
    dims = (-3, -2, -1)
    size = x.shape[-3:]
    f = torch.fft.fftn(x, dim=dims)
    # |k| of the uncentred spectrum: the centred radius grid, shifted back
    radius = torch.fft.ifftshift(radius_grid(tuple(size), device=x.device, dtype=torch.float64))
    beyond = radius**2 >= float(shell) ** 2
    gen_device = generator.device if generator is not None else torch.device("cpu")
    t = torch.rand(f.shape, generator=generator, device=gen_device, dtype=torch.float64)
    t = t.to(x.device) * (2 * math.pi)
    # t(-k): index -i mod n on every axis = flip, then roll by one.
    t_neg = torch.roll(torch.flip(t, dims=dims), shifts=(1, 1, 1), dims=dims)
    phase = torch.where(beyond, t - t_neg, torch.zeros_like(t)).to(x.dtype)
    out = torch.fft.ifftn(f * torch.polar(torch.ones_like(phase), phase), dim=dims)
    return out.real
