"""The maximisation step: regularised class reconstructions and the spectra that drive them.

Per class ``k`` of a replicate, from the E-step's CTF- and posterior-weighted backprojection
(the sums of :class:`hetero.physics.reconstruction.BackprojectionAccumulator`, kept per half
set)::

    V_k(q) = sum_i g_ik CTF_i X_i (q) / ( sum_i g_ik CTF_i^2 (q) + lambda(q) )
    lambda(q) = mean weight of the shell of q / (T * SSNR_k(shell))

(the division being the accumulator's ``reconstruct``: RELION's gridding density compensation
of the regularised weights, as RELION's ``BackProjector::reconstruct`` does with ``1 / tau2``)

This is RELION's MAP update ``data / (weight + 1 / (T tau2))``, ``T`` being ``--tau2_fudge``
(> 1 trusts the data more), written through ``data_vs_prior(s)`` (the shell mean of
``weight / lambda``), with the signal power ``tau2`` from one of two sources
(``model.tau2_source``):

* ``power`` (default, RELION's Class3D): ``tau2`` is the power spectrum of the class reference
  the E-step used (``MlModel::setFourierTransformMaps``), so
  ``data_vs_prior = T tau2 pad^3 mean_w / sigma2`` (:func:`power_data_vs_prior`;
  ``BackProjector::updateSSNRarrays`` without FSC; RELION's weights hold the ``1 / sigma2`` that
  ours leave out). At low SNR the references' power falls off where the data stop carrying
  signal, so the maps are Wiener-filtered there and the current resolution stays low.
* ``fsc`` (RELION's auto-refine, the issue's first wording): ``tau2`` from the class's Fourier
  shell correlation between its two half sets (``updateSSNRarrays`` with
  ``update_tau2_with_fsc``: the half-set FSC of the unregularised half reconstructions of this
  iteration, clipped to [0.001, 0.999], the whole map's ``SSNR`` from ``sqrt(2 FSC / (1 + FSC))``),
  ``data_vs_prior = T SSNR``. Both halves of a class are assigned with the same references, so
  at low SNR reference bias inflates this FSC: the prior barely regularises and the current
  resolution sits at Nyquist (the class3d benchmark in ``docs/benchmarks.md``).

The regulariser is thus in the accumulator's own units, whatever its grid. Data beyond the
replicate's current size are left out, as RELION never backprojects them. ``data_vs_prior``
sets the next current resolution (RELION's ``updateCurrentResolution``: the last shell before
it drops below 1, plus ``incr_size``).

Example usage::

    fsc = half_set_fsc(acc_half1, acc_half2, r_max=19)
    vol, dvp = regularised_reconstruct(acc_full, fsc, tau2_fudge=4.0, r_max=19)
"""

from __future__ import annotations

import copy
import functools
import math

import torch
from torch import Tensor

from hetero.physics.fourier import fft3_centered, ifft3_centered, radial_average, radius_grid
from hetero.physics.fsc import fsc
from hetero.physics.reconstruction import BackprojectionAccumulator, _mirror

#: RELION's WIDTH_FMASK_EDGE: raised-cosine width (shells) of its Fourier low-pass filters.
WIDTH_FMASK_EDGE = 2.0


def shell_power(volumes: Tensor) -> Tensor:
    """Power per real/imaginary component, averaged over Fourier shells ``round(|k|)``.

    ``(..., D, D, D)`` -> ``(..., D // 2 + 1)`` float64: ``mean |F|^2 / 2`` of the unnormalised
    3-D DFT, which equals the power of the 2-D DFT of projections at the same frequencies.
    """
    f = fft3_centered(volumes.double())
    return radial_average(f.real**2 + f.imag**2, ndim=3) / 2


def padded_shells(acc: BackprojectionAccumulator) -> Tensor:
    """``(P, P, P)`` shell index (in ``D``-grid shells) of each voxel of the accumulator grid."""
    return _padded_shells(acc.padded_size, acc.box_size, acc.weight.device)


@functools.lru_cache(maxsize=2)
def _padded_shells(padded: int, box: int, device: torch.device) -> Tensor:
    r = radius_grid((padded,) * 3, device=device, dtype=torch.float64)
    return torch.round(r * box / padded).to(torch.int32)


def _shell_sum(values: Tensor, idx: Tensor, sel: Tensor, n_shells: int) -> Tensor:
    out = torch.zeros(n_shells, dtype=torch.float64, device=values.device)
    return out.index_add_(0, idx[sel], values[sel].double())


def _within(acc: BackprojectionAccumulator, r_max: int) -> BackprojectionAccumulator:
    """A shallow copy of ``acc`` whose numerator keeps only the voxels within ``r_max`` shells."""
    out = copy.copy(acc)
    out.numerator = torch.where(padded_shells(acc) <= int(r_max), acc.numerator, 0)
    return out


def reconstructed_radius(acc: BackprojectionAccumulator, r_max: int) -> float:
    """The reconstructed Fourier radius (shells of ``D``) for data within ``r_max`` shells."""
    return min(acc.box_size / 2, int(r_max) + 0.5)


def half_set_fsc(
    half1: BackprojectionAccumulator, half2: BackprojectionAccumulator, r_max: int, min_weight: float = 1e-3
) -> Tensor:
    """FSC per shell ``(D // 2 + 1,)`` float64 between the unregularised half-set reconstructions
    (:meth:`~BackprojectionAccumulator.reconstruct` of the data within ``r_max``, with RELION's
    density compensation, no outside mask, a weight floor of ``min_weight`` times the median
    weight), as RELION compares its half maps; shells beyond
    ``r_max`` are 0, shell 0 is 1, a half set without data gives 0.

    (The voxel-wise ratio ``numerator / weight`` of the padded grid is no substitute: the
    ``D``-grid slices reach most padded voxels only through small trilinear weights, which kept
    the FSC of noiseless data near 0.8 at high frequency.)
    """
    n_shells = half1.box_size // 2 + 1
    if not (bool((half1.weight > 0).any()) and bool((half2.weight > 0).any())):
        return torch.zeros(n_shells, dtype=torch.float64, device=half1.weight.device)
    # A weight floor (min_weight x the median weight, a constant Wiener term) keeps voxels the
    # few images of a small class leave (nearly) empty from dominating their shells.
    w = torch.cat([(h.weight + _mirror(h.weight)).flatten() for h in (half1, half2)])
    floor = float(min_weight * torch.median(w[w > 0]))
    radius = reconstructed_radius(half1, r_max)
    maps = [_within(h, r_max).reconstruct(1.0 / floor, mask_outside=False, r_max=radius) for h in (half1, half2)]
    curve = fsc(maps[0], maps[1]).double()
    curve = torch.where(torch.arange(n_shells, device=curve.device) <= int(r_max), curve, 0.0)
    curve[0] = 1.0
    return curve


def whole_map_ssnr(fsc: Tensor) -> Tensor:
    """RELION's SSNR of the map from both halves: ``f = sqrt(2 FSC / (FSC + 1))`` (FSC clipped to
    [0.001, 0.999] first, ``f`` to 0.999), ``SSNR = f / (1 - f)``."""
    f = fsc.clamp(min=0.001)
    f = torch.sqrt(2 * f / (f + 1)).clamp(max=0.999)
    return f / (1 - f)


def _shell_mean_weight(acc: BackprojectionAccumulator, r_max: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mean accumulated weight per shell (both Hermitian halves) within ``r_max``, with the
    shell index of every padded voxel and the selection of voxels within ``r_max``."""
    shells = padded_shells(acc)
    n_shells = acc.box_size // 2 + 1
    idx = shells.clamp(max=n_shells - 1).long()
    sel = (shells <= int(r_max)).flatten()
    flat_idx = idx.flatten()
    count = torch.bincount(flat_idx[sel], minlength=n_shells).double().clamp(min=1)
    # The accumulator holds one half plane; reconstruct() adds the Hermitian mirror of the
    # weights, so the shell means are taken over both.
    full = acc.weight + _mirror(acc.weight)
    return _shell_sum(full.flatten(), flat_idx, sel, n_shells) / count, idx, sel


def power_data_vs_prior(
    acc: BackprojectionAccumulator, tau2: Tensor, sigma2: Tensor, tau2_fudge: float, r_max: int,
    fraction: float = 1.0,
) -> Tensor:
    """RELION Class3D's ``data_vs_prior`` per shell with ``tau2`` the reference's power spectrum.

    ``T * tau2(s) * pad^3 * mean_w(s) * fraction / sigma2(s)`` (RELION
    ``MlModel::setFourierTransformMaps`` + ``BackProjector::updateSSNRarrays`` without FSC, or
    ``MlModel::initialiseDataVersusPrior`` with ``fraction = pdf_class`` for the first
    iteration): ``mean_w`` is the shell mean of the accumulated ``CTF^2`` on the padded grid
    (``pad^3`` is RELION's oversampling correction: per voxel, a slice of the padded grid
    carries ``1 / pad^3`` of the weight it carries on the ``D`` grid), ``sigma2`` the noise
    power per component of the E-step that made the sums (RELION's weights hold ``1 / sigma2``,
    ours do not), ``tau2`` per component (:func:`shell_power`). Shells without noise estimate or
    beyond ``r_max`` are 0. ``(D // 2 + 1,)`` float64.
    """
    mean_w, _, _ = _shell_mean_weight(acc, r_max)
    pad3 = (acc.padded_size / acc.box_size) ** 3
    s2 = sigma2.to(mean_w)
    n = mean_w.numel()
    dvp = float(tau2_fudge) * tau2.to(mean_w)[:n] * pad3 * mean_w * float(fraction) / s2.clamp(min=1e-300)[:n]
    dvp = torch.where(s2[:n] > 0, dvp, 0.0)
    return torch.where(torch.arange(n, device=dvp.device) <= int(r_max), dvp, 0.0)


def regularised_reconstruct(
    acc: BackprojectionAccumulator, fsc: Tensor | None, tau2_fudge: float, r_max: int, do_map: bool = True,
    data_vs_prior: Tensor | None = None, minres_map: int = 0,
) -> tuple[Tensor, Tensor | None]:
    """One class map from the sum of its half-set accumulators (see the module docstring).

    :param fsc: ``(D // 2 + 1,)`` half-set FSC of the class (:func:`half_set_fsc`), giving
        ``data_vs_prior = T * SSNR(FSC)`` (auto-refine's prior); ignored when ``data_vs_prior``
        is given.
    :param data_vs_prior: ``(D // 2 + 1,)`` the prior as RELION's ``data_vs_prior`` per shell,
        e.g. :func:`power_data_vs_prior` (Class3D's prior); shells where it is below ``1e-3``
        (no signal power) are regularised as by ``1e-3``, as RELION does for ``tau2 = 0``.
    :param tau2_fudge: RELION's ``T`` (> 0).
    :param minres_map: shells below it get no prior (RELION ``BackProjector::reconstruct`` adds
        ``1 / tau2`` only from ``--minres_map`` on); ``data_vs_prior`` is returned for all.
    :param r_max: current size radius (shells): data beyond it are not used.
    :param do_map: ``False``: no prior (RELION ``--no_map``), the plain
        :meth:`~BackprojectionAccumulator.reconstruct` of the data within ``r_max``.
    :return: ``(D, D, D)`` float32 map and ``data_vs_prior (D // 2 + 1,)`` float64 (``None``
        without the prior).
    """
    n_shells = acc.box_size // 2 + 1
    reg = _within(acc, r_max)
    if not do_map:
        return reg.reconstruct(r_max=reconstructed_radius(acc, r_max)).float(), None
    mean_w, idx, _ = _shell_mean_weight(acc, r_max)
    if data_vs_prior is not None:
        dvp = data_vs_prior.to(mean_w)[:n_shells].clamp(min=1e-3)
    else:
        dvp = float(tau2_fudge) * whole_map_ssnr(fsc.to(mean_w))
    # Half of lambda (symmetric) goes in: reconstruct() adds the Hermitian mirror of the weights.
    lam = torch.where(torch.arange(n_shells, device=dvp.device) >= int(minres_map), mean_w / dvp, 0.0)
    lam = lam.to(acc.weight.dtype)[idx]
    reg.weight = acc.weight + lam / 2
    dvp = torch.where(torch.arange(n_shells, device=dvp.device) <= int(r_max), dvp, 0.0)
    # The prior is in the weights: no flooring of small weights (1 / 1e30 only avoids 0 / 0).
    return reg.reconstruct(wiener_snr=1e30, r_max=reconstructed_radius(acc, r_max)).float(), dvp


def last_ssnr_shell(data_vs_prior: Tensor, end: int) -> int:
    """The last shell before ``data_vs_prior (S,)`` first drops below 1, searching shells
    ``1 .. end - 1`` (``end - 1`` when it never does): RELION's resolution of a class."""
    below = torch.nonzero(data_vs_prior[1:int(end)] < 1).flatten()
    return (int(below[0]) + 1 if below.numel() else int(end)) - 1


def current_radius(
    data_vs_prior: Tensor, prior: Tensor, box_size: int, incr_size: int = 10, minres_map: int = 5
) -> int:
    """The next current size radius (shells) from the classes' ``data_vs_prior (K, n_shells)``.

    RELION ``updateCurrentResolution`` + ``updateImageSizeAndResolutionPointers``: per class
    with a non-zero prior, the last shell before ``data_vs_prior`` first drops below 1 (from
    shell 1); the maximum over classes, at least ``minres_map``, plus ``incr_size`` shells,
    capped at Nyquist.
    """
    nyquist = box_size // 2
    maxres = 0
    for k in range(data_vs_prior.shape[0]):
        if float(prior[k]) <= 0:
            continue
        maxres = max(maxres, last_ssnr_shell(data_vs_prior[k], nyquist))
    maxres = max(maxres, int(minres_map))
    return min(nyquist, maxres + int(incr_size))


def lowpass(volumes: Tensor, radius: float, width: float = WIDTH_FMASK_EDGE) -> Tensor:
    """RELION's raised-cosine low-pass filter: 1 up to ``radius - width/2`` shells, 0 beyond
    ``radius + width/2``. ``(..., D, D, D)``."""
    d = volumes.shape[-1]
    r = radius_grid((d, d, d), device=volumes.device, dtype=torch.float64)
    lo = radius - width / 2
    filt = torch.where(r < lo, 1.0, torch.where(r > lo + width, 0.0,
                                                 0.5 - 0.5 * torch.cos(math.pi * (lo + width - r) / width)))
    return ifft3_centered(fft3_centered(volumes.double()) * filt).real.to(volumes.dtype)


def perturb(volume: Tensor, generator: torch.Generator, amplitude: float) -> Tensor:
    """``volume`` plus seeded Gaussian noise whose power spectrum is ``amplitude^2`` times the
    volume's own (shell by shell): class maps that start equal but not identical."""
    d = volume.shape[-1]
    noise = torch.randn(volume.shape, generator=generator, dtype=torch.float64).to(volume.device)
    fv = fft3_centered(volume.double())
    fn = fft3_centered(noise)
    pv = radial_average(fv.real**2 + fv.imag**2, ndim=3)
    pn = radial_average(fn.real**2 + fn.imag**2, ndim=3)
    scale = torch.where(pn > 0, torch.sqrt(pv / pn.clamp(min=1e-300)), 0.0)
    shells = torch.round(radius_grid((d, d, d), device=volume.device, dtype=torch.float64)).long()
    gain = scale[shells.clamp(max=scale.numel() - 1)] * (shells < scale.numel())
    shaped = ifft3_centered(fn * gain).real
    return (volume.double() + amplitude * shaped).to(volume.dtype)


def class_priors(class_weight: Tensor) -> Tensor:
    """``pi_k = sum_i g_ik / sum_ik g_ik`` per replicate: ``(U, K)`` -> ``(U, K)``."""
    total = class_weight.sum(-1, keepdim=True)
    return torch.where(total > 0, class_weight / total.clamp(min=1e-300), 1.0 / class_weight.shape[-1])


def noise_spectrum(residual: Tensor, count: Tensor, npix: Tensor) -> Tensor:
    """``sigma2(s) = sum_i sum_k g_ik |X - CTF V_k|^2 (s) / (2 n Npix(s))`` (RELION's update).

    ``residual (U, n_shells)``, ``count (U,)`` particles, ``npix (n_shells,)``.
    """
    denom = 2 * count[:, None] * npix.to(residual)[None]
    return torch.where(denom > 0, residual / denom.clamp(min=1e-300), 0)
