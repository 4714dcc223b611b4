"""Fourier-space image loss with noise whitening (DynaMight's data term).

Images are compared through their ``rfft2`` half spectra (numpy order, unnormalised). With
whitening weights ``W(k)``::

    L = mean_b  sum_k h(k) W(k) |P_b(k) - Y_b(k)|^2 / D^4

where ``h`` counts each half-spectrum column once or twice (Hermitian symmetry), so with
``W = 1`` this is exactly the per-pixel mean squared error (Parseval). DynaMight estimates the
noise power ``Sigma(k)`` per Fourier shell from the residuals of validation images and uses
``W = 1 / Sigma``, scaled to ``max 1``, zero beyond Nyquist, then rescaled so that ``sum W^2``
over the full ``D x D`` grid is ``D^2`` (reference ``optimize_deformations``).

Example usage::

    shells = rfft_shell_index(64)
    err = radial_mean_rfft(residual.abs() ** 2, shells, 33)            # (B, 33)
    w = whitening_weights(noise_power, 64)                               # (64, 33)
    loss = whitened_squared_error(pred, target, 64, w)                   # (B,)
"""

from __future__ import annotations

import torch
from torch import Tensor


def hermitian_weights(size: int, device=None, dtype=torch.float32) -> Tensor:
    """``(D // 2 + 1,)`` multiplicity of each ``rfft`` column in the full spectrum (1 or 2)."""
    h = torch.full((size // 2 + 1,), 2.0, device=device, dtype=dtype)
    h[0] = 1.0
    if size % 2 == 0:
        h[-1] = 1.0
    return h


def rfft_shell_index(size: int, device=None) -> Tensor:
    """``(D, D // 2 + 1)`` integer shell ``round(|k| D)`` of each ``rfft2`` coefficient."""
    ky = torch.fft.fftfreq(size, device=device, dtype=torch.float64) * size
    kx = torch.fft.rfftfreq(size, device=device, dtype=torch.float64) * size
    return torch.round(torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)).long()


def radial_mean_rfft(values: Tensor, shells: Tensor, n_shells: int) -> Tensor:
    """Mean of ``(..., D, D // 2 + 1)`` values over shells ``0 .. n_shells - 1`` (each rfft
    coefficient weighted by its Hermitian multiplicity) -> ``(..., n_shells)``."""
    size = values.shape[-2]
    h = hermitian_weights(size, device=values.device, dtype=values.dtype)
    idx = shells.flatten()
    keep = idx < n_shells
    weighted = (values * h).flatten(-2)[..., keep]
    counts = torch.zeros(n_shells, device=values.device, dtype=values.dtype)
    counts.index_add_(0, idx[keep], h.expand(shells.shape).flatten()[keep])
    sums = weighted.new_zeros(*weighted.shape[:-1], n_shells).index_add_(-1, idx[keep], weighted)
    return sums / counts.clamp(min=1e-12)


def whitening_weights(noise_power: Tensor, size: int) -> Tensor:
    """``(D, D // 2 + 1)`` weights ``W = 1 / Sigma(|k|)``: max 1, zero beyond Nyquist, then
    scaled so that ``sum W^2 = D^2`` over the full grid (the reference's normalisation).

    :param noise_power: ``(n_shells,)`` with ``n_shells >= D // 2 + 1`` (positive).
    """
    shells = rfft_shell_index(size, device=noise_power.device)
    n = size // 2 + 1
    inv = 1.0 / noise_power[:n].double().clamp(min=1e-30)
    inv = inv / inv.max()
    w = torch.where(shells < n, inv[shells.clamp(max=n - 1)], torch.zeros((), dtype=inv.dtype, device=inv.device))
    h = hermitian_weights(size, device=w.device, dtype=w.dtype)
    total = (h * w * w).sum()
    return (w * (size / torch.sqrt(total))).float()


def whitened_squared_error(
    predicted: Tensor, target: Tensor, size: int, weights: Tensor | None = None
) -> Tensor:
    """Per-image ``sum_k h W |P - Y|^2 / D^4`` of ``(B, D, D // 2 + 1)`` half spectra -> ``(B,)``
    (float32; equals the per-pixel MSE of the images when ``weights`` is ``None``)."""
    diff = predicted - target
    power = diff.real.float() ** 2 + diff.imag.float() ** 2
    if weights is not None:
        power = power * weights
    h = hermitian_weights(size, device=power.device)
    return (power * h).sum((-2, -1)) / float(size) ** 4


__all__ = [
    "hermitian_weights",
    "radial_mean_rfft",
    "rfft_shell_index",
    "whitened_squared_error",
    "whitening_weights",
]
