"""Gold-standard resolution of half maps: FSC without and with a soft mask made from the map.

The mask follows ``relion_mask_create``: the full map is low-pass filtered (Gaussian, to
``lowpass_angstrom``), thresholded at ``threshold`` x its maximum, extended by ``extend_px``
and given a raised-cosine edge of ``soft_edge_px`` (:func:`hetero.physics.masks.soft_mask_from_volume`).
Resolutions are where the FSC between the half maps first drops below 0.143 (gold standard)
and 0.5, in Å (:func:`hetero.physics.fsc.fsc_resolution`; Nyquist if it never does).

The masked FSC is corrected as ``relion_postprocess`` does (Chen et al. 2013, Ultramicroscopy
135:24, "high-resolution noise substitution"): both half maps get random phases beyond the first
shell where the unmasked FSC drops below 0.8, the masked FSC of those maps measures the
correlation the mask alone creates, and ``(fsc_masked - fsc_random) / (1 - fsc_random)``
replaces the masked FSC from 2 shells past the randomisation shell. Differences from RELION
3.1.3 (measured by ``benchmarks/relion_postprocess_fsc.py``): our random phases differ, so the
corrected curve differs by the noise of the phase-randomised curve; resolutions interpolate
between shells (RELION reports the last shell at or above the threshold). The FSC sums shells
over RELION's half-complex spectrum (``fsc(..., half_spectrum=True)``), so the unmasked and
masked curves are RELION's to float precision.

Example usage::

    mask = map_mask(full, apix, lowpass_angstrom=15.0)
    res = half_map_resolution(half1, half2, apix, mask, seed=0)
    res["res_0.143_masked"]          # corrected masked FSC at 0.143, Å
    res["randomise_from_angstrom"]   # where the phases were randomised
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hetero.physics.fourier import (
    fft3_centered,
    ifft3_centered,
    radius_grid,
    randomise_phases_beyond,
)
from hetero.physics.fsc import (
    fsc,
    fsc_corrected,
    fsc_resolution,
    randomise_from_shell,
    shell_resolution_angstrom,
)
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
    half1: Tensor,
    half2: Tensor,
    apix: float,
    mask: Tensor | None = None,
    seed: int = 0,
    randomize_at_fsc: float = 0.8,
) -> dict:
    """FSC between half maps, unmasked and (if ``mask``) masked with RELION's phase-randomisation
    correction (module docstring), and their resolutions.

    :param half1, half2: ``(D, D, D)`` half maps (any device; FFTs in float64).
    :param apix: pixel size, Å. :param mask: ``(D, D, D)`` soft mask in ``[0, 1]`` or ``None``.
    :param seed: seed of the ``torch.Generator`` (CPU) drawing the random phases, half1's
        first: the same seed gives the same curves on CPU and CUDA.
    :param randomize_at_fsc: unmasked-FSC value below which phases are randomised
        (``relion_postprocess --randomize_at_fsc``, default 0.8).
    :return: curves are lists of ``D // 2 + 1`` floats (shell 0 = DC), resolutions in Å::

        fsc_unmasked, res_0.143_unmasked, res_0.5_unmasked
        fsc_masked, res_0.143_masked, res_0.5_masked          # CORRECTED (RELION's fsc_true)
        fsc_masked_uncorrected, res_0.143_masked_uncorrected, res_0.5_masked_uncorrected
        fsc_phase_randomised      # masked FSC of the phase-randomised half maps
        randomise_from_shell, randomise_from_angstrom

      Every masked key is ``None`` without a mask; ``fsc_phase_randomised`` and the
      randomisation keys are ``None`` when the unmasked FSC never drops below
      ``randomize_at_fsc`` (then no correction is made: ``fsc_masked`` is the raw curve;
      RELION 3.1.3's postprocess stops with an error there).
    """
    d = int(half1.shape[-1])
    unmasked = fsc(half1, half2, half_spectrum=True)
    out: dict = {"fsc_unmasked": [float(c) for c in unmasked]}
    out.update({f"res_{t}_unmasked": fsc_resolution(unmasked, d, apix, t) for t in THRESHOLDS})
    masked_keys = ["fsc_masked", "fsc_masked_uncorrected", "fsc_phase_randomised",
                   "randomise_from_shell", "randomise_from_angstrom"]
    for t in THRESHOLDS:
        masked_keys += [f"res_{t}_masked", f"res_{t}_masked_uncorrected"]
    out.update(dict.fromkeys(masked_keys))
    if mask is None:
        return out
    raw = fsc(half1, half2, mask, half_spectrum=True)
    corrected = raw
    shell = randomise_from_shell(unmasked, randomize_at_fsc)
    if shell is not None:
        gen = torch.Generator().manual_seed(int(seed))
        r1 = randomise_phases_beyond(half1, shell, gen)
        r2 = randomise_phases_beyond(half2, shell, gen)
        random = fsc(r1, r2, mask, half_spectrum=True)
        corrected = fsc_corrected(raw, random, shell)
        out["fsc_phase_randomised"] = [float(c) for c in random]
        out["randomise_from_shell"] = shell
        out["randomise_from_angstrom"] = d * float(apix) / shell
    out["fsc_masked"] = [float(c) for c in corrected]
    out["fsc_masked_uncorrected"] = [float(c) for c in raw]
    for t in THRESHOLDS:
        out[f"res_{t}_masked"] = fsc_resolution(corrected, d, apix, t)
        out[f"res_{t}_masked_uncorrected"] = fsc_resolution(raw, d, apix, t)
    return out


def fsc_table(curves: dict[str, list[float] | None], box_size: int, apix: float) -> str:
    """CSV text: ``shell, frequency_per_angstrom, resolution_angstrom, <curve name>...``.

    Every curve named in ``curves`` has its column, in the given order; a ``None`` curve (no
    mask, no phase randomisation) gives an empty column, so files of one run share one header.
    """
    names = list(curves)
    res = shell_resolution_angstrom(box_size, apix)
    lines = [",".join(["shell", "frequency_per_angstrom", "resolution_angstrom", *names])]
    for k in range(box_size // 2 + 1):
        row = [str(k), f"{k / (box_size * apix):.6g}", f"{float(res[k]):.6g}"]
        row += ["" if curves[name] is None else f"{curves[name][k]:.6f}" for name in names]
        lines.append(",".join(row))
    return "\n".join(lines) + "\n"
