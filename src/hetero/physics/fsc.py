"""Fourier shell correlation and resolution estimates.

Shells are ``round(|k|)`` of the centred 3-D spectrum, ``k = 0 .. D/2`` (shell D/2 is Nyquist).
``fsc_resolution`` returns the resolution in Å at which the curve first crosses a threshold
(0.143 for half maps, 0.5 against a reference), interpolating linearly between shells.

Example usage::

    curve = fsc(half1, half2)                                   # (D/2 + 1,)
    res = fsc_resolution(curve, box_size=D, pixel_size_angstrom=1.5, threshold=0.143)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hetero.physics.fourier import fft3_centered, radial_shell_index


def fsc(volume_a: Tensor, volume_b: Tensor, mask: Tensor | None = None) -> Tensor:
    """FSC between ``(..., D, D, D)`` volumes: ``Re<Fa, Fb> / (|Fa| |Fb|)`` per shell.

    :param mask: optional real-space ``(D, D, D)`` mask multiplied into both volumes.
    :return: ``(..., D // 2 + 1)`` with shell 0 (the DC term) included.
    """
    if mask is not None:
        volume_a, volume_b = volume_a * mask, volume_b * mask
    fa = fft3_centered(volume_a.to(torch.float64))
    fb = fft3_centered(volume_b.to(torch.float64))
    size = volume_a.shape[-1]
    n = size // 2 + 1
    idx = radial_shell_index((size,) * 3, device=fa.device).flatten()
    keep = idx < n
    idx = idx[keep]

    def shell_sum(x: Tensor) -> Tensor:
        flat = x.reshape(*x.shape[:-3], -1)[..., keep]
        return flat.new_zeros(*flat.shape[:-1], n).index_add_(-1, idx, flat)

    cross = shell_sum((fa * fb.conj()).real)
    pa = shell_sum(fa.abs() ** 2)
    pb = shell_sum(fb.abs() ** 2)
    return (cross / torch.sqrt(pa * pb).clamp(min=1e-30)).to(torch.float32)


def shell_resolution_angstrom(box_size: int, pixel_size_angstrom: float) -> Tensor:
    """Resolution in Å of each shell ``k`` (``inf`` for k = 0): ``D * apix / k``."""
    k = torch.arange(box_size // 2 + 1, dtype=torch.float64)
    return (box_size * pixel_size_angstrom / k).to(torch.float32)


def fsc_crossing(curve: Tensor, threshold: float) -> float:
    """Fractional shell index where ``curve`` first drops below ``threshold`` (after shell 0).

    Returns the last shell (Nyquist) if it never crosses.
    """
    c = curve.detach().cpu().double()
    for k in range(1, c.numel()):
        if c[k] < threshold:
            prev = c[k - 1].item()
            cur = c[k].item()
            frac = (prev - threshold) / (prev - cur) if prev != cur else 0.0
            return (k - 1) + frac
    return float(c.numel() - 1)


def fsc_resolution(
    curve: Tensor, box_size: int, pixel_size_angstrom: float, threshold: float = 0.143
) -> float:
    """Resolution in Å where the FSC first crosses ``threshold`` (Nyquist if it never does)."""
    k = fsc_crossing(curve, threshold)
    return math.inf if k <= 0 else box_size * pixel_size_angstrom / k


def fsc_auc(curve: Tensor, box_size: int) -> float:
    """CryoBench's area under the FSC curve: trapezoid of ``|FSC|`` over shells ``0 .. D/2 - 1``
    (the Nyquist shell ``D/2`` is left out) against frequency ``k / D`` (cycles/pixel), with
    ``FSC[0] := 1``. Identical maps give ``(D/2 - 1) / D``."""
    c = curve.detach().cpu().double().abs().clone()
    n = box_size // 2
    c = c[:n]
    c[0] = 1.0
    x = torch.arange(n, dtype=torch.float64) / box_size
    return float(torch.trapezoid(c, x))
