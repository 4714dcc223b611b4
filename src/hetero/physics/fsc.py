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


def fsc(
    volume_a: Tensor, volume_b: Tensor, mask: Tensor | None = None, half_spectrum: bool = False
) -> Tensor:
    """FSC between ``(..., D, D, D)`` volumes: ``Re<Fa, Fb> / (|Fa| |Fb|)`` per shell.

    :param mask: optional real-space ``(D, D, D)`` mask multiplied into both volumes.
    :param half_spectrum: sum each shell over RELION's half-complex transform (``kx = 0 .. D/2``,
        as ``getFSC`` in ``relion_postprocess``; reproduces its curves to float precision)
        instead of the full spectrum. The two differ only in the weight of the ``kx = 0`` and
        Nyquist planes (by ~1e-3 on a 48-px box at low shells).
    :return: ``(..., D // 2 + 1)`` with shell 0 (the DC term) included.
    """
    if mask is not None:
        volume_a, volume_b = volume_a * mask, volume_b * mask
    size = volume_a.shape[-1]
    n = size // 2 + 1
    if half_spectrum:
        dims = (-3, -2, -1)
        fa = torch.fft.rfftn(volume_a.to(torch.float64), dim=dims)
        fb = torch.fft.rfftn(volume_b.to(torch.float64), dim=dims)
        ax = [torch.fft.fftfreq(m, 1.0 / m, dtype=torch.float64) for m in volume_a.shape[-3:-1]]
        ax.append(torch.arange(fa.shape[-1], dtype=torch.float64))
        kz, ky, kx = torch.meshgrid(*ax, indexing="ij")
        idx = torch.round(torch.sqrt(kz**2 + ky**2 + kx**2)).long().to(fa.device).flatten()
    else:
        fa = fft3_centered(volume_a.to(torch.float64))
        fb = fft3_centered(volume_b.to(torch.float64))
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


def randomise_from_shell(fsc_unmasked: Tensor, threshold: float = 0.8) -> int | None:
    """First shell ``k >= 1`` where the UNMASKED half-map FSC drops below ``threshold``: where
    ``relion_postprocess --randomize_at_fsc 0.8`` (its default) starts phase randomisation
    (checked on RELION 3.1.3's output). ``None`` if the curve never drops below it."""
    c = fsc_unmasked.detach().cpu().double()
    for k in range(1, c.numel()):
        if c[k] < threshold:
            return k
    return None


def fsc_corrected(
    fsc_masked: Tensor, fsc_random_masked: Tensor, randomise_from: int, start_offset: int = 2
) -> Tensor:
    """Masked FSC corrected by high-resolution noise substitution (Chen et al. 2013,
    Ultramicroscopy 135:24), as ``relion_postprocess`` computes ``fsc_true``.

    ``(fsc_masked - fsc_random_masked) / (1 - fsc_random_masked)`` from shell
    ``randomise_from + start_offset`` on, ``fsc_masked`` below it. Not clipped: where the
    randomised curve exceeds the masked one the result is negative, as in RELION 3.1.3. RELION starts 2 shells past the randomisation shell ("because of
    small artefacts near the resolution of randomisation"; verified on RELION 3.1.3's output).

    :param fsc_masked: ``(D/2 + 1,)`` FSC of the masked half maps.
    :param fsc_random_masked: ``(D/2 + 1,)`` FSC of the masked half maps whose phases were
        randomised at ``|k| >= randomise_from`` (:func:`hetero.physics.fourier.randomise_phases_beyond`).
    :return: ``(D/2 + 1,)`` float32.
    """
    m = fsc_masked.detach().double()
    r = fsc_random_masked.detach().double().to(m.device)
    true = (m - r) / (1 - r).clamp(min=1e-12)
    k = torch.arange(m.numel(), device=m.device)
    return torch.where(k < randomise_from + start_offset, m, true).to(torch.float32)
