"""Gold-standard resolution of half maps: FSC without and with a soft mask made from the map.

The mask follows ``relion_mask_create``: the full map is low-pass filtered (Gaussian, to
``lowpass_angstrom``), thresholded at ``threshold`` x its maximum, extended by ``extend_px``
and given a raised-cosine edge of ``soft_edge_px`` (:func:`hetero.physics.masks.soft_mask_from_volume`).
Resolutions are where the FSC between the half maps first drops below 0.143 (gold standard)
and 0.5, in Å (:func:`hetero.physics.fsc.fsc_resolution`; Nyquist if it never does). No
phase-randomisation correction of the masked FSC is made (RELION's postprocess does one), so a
tight mask can raise the masked curve somewhat.

Example usage::

    mask = map_mask(full, apix, lowpass_angstrom=15.0)
    res = half_map_resolution(half1, half2, apix, mask)   # {"fsc_unmasked": [...], "res_0.143_masked": 7.9, ...}
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hetero.physics.fourier import fft3_centered, ifft3_centered, radius_grid
from hetero.physics.fsc import fsc, fsc_resolution, shell_resolution_angstrom
from hetero.physics.masks import soft_mask_from_volume

THRESHOLDS = (0.143, 0.5)


def lowpass(volume: Tensor, apix: float, resolution_angstrom: float) -> Tensor:
    """Gaussian low-pass ``exp(-s^2 / (2 s0^2))`` with ``s0 = 1 / resolution`` (1/Å)."""
    d = volume.shape[-1]
    s = radius_grid((d, d, d), device=volume.device, dtype=torch.float64) / (d * apix)
    s0 = 1.0 / float(resolution_angstrom)
    return ifft3_centered(
        fft3_centered(volume.double()) * torch.exp(-(s**2) / (2 * s0**2))
    ).real.float()


def map_mask(
    volume: Tensor,
    apix: float,
    lowpass_angstrom: float = 15.0,
    threshold: float = 0.1,
    extend_px: int = 3,
    soft_edge_px: int = 5,
) -> Tensor | None:
    """Soft ``(D, D, D)`` mask in ``[0, 1]`` from ``volume``, or ``None`` when the map has no
    positive density to threshold (e.g. an empty group)."""
    smooth = lowpass(volume, apix, max(float(lowpass_angstrom), 2.0 * apix))
    top = float(smooth.max())
    if not math.isfinite(top) or top <= 0:
        return None
    return soft_mask_from_volume(smooth, threshold * top, int(extend_px), int(soft_edge_px))


def half_map_resolution(
    half1: Tensor, half2: Tensor, apix: float, mask: Tensor | None = None
) -> dict:
    """FSC between half maps, unmasked and (if ``mask``) masked, and their resolutions.

    :return: ``{"fsc_unmasked": list, "fsc_masked": list | None, "res_0.143_unmasked",
        "res_0.5_unmasked", "res_0.143_masked", "res_0.5_masked"}`` (Å; ``None`` without mask).
    """
    d = int(half1.shape[-1])
    out: dict = {}
    for kind, m in (("unmasked", None), ("masked", mask)):
        if kind == "masked" and m is None:
            out["fsc_masked"] = None
            out.update({f"res_{t}_masked": None for t in THRESHOLDS})
            continue
        curve = fsc(half1, half2, m)
        out[f"fsc_{kind}"] = [float(c) for c in curve]
        for t in THRESHOLDS:
            out[f"res_{t}_{kind}"] = fsc_resolution(curve, d, apix, t)
    return out


def fsc_table(curves: dict[str, list[float] | None], box_size: int, apix: float) -> str:
    """CSV text: ``shell, frequency_per_angstrom, resolution_angstrom, <curve name>...``."""
    names = [k for k, v in curves.items() if v is not None]
    res = shell_resolution_angstrom(box_size, apix)
    lines = [",".join(["shell", "frequency_per_angstrom", "resolution_angstrom", *names])]
    for k in range(box_size // 2 + 1):
        row = [str(k), f"{k / (box_size * apix):.6g}", f"{float(res[k]):.6g}"]
        row += [f"{curves[name][k]:.6f}" for name in names]
        lines.append(",".join(row))
    return "\n".join(lines) + "\n"
