"""The expectation step of maximum-likelihood 3D classification with fixed poses.

For particle ``i`` of replicate ``u`` and class ``k`` (RELION, Scheres 2012 JMB eq. 3-4, with
``--skip_align``: one pose, no translations)::

    diff2_ik = sum_{m in E} |X_im - CTF_im V_uk(A_i^T k_m)|^2 / (2 sigma2_u(shell m))
    gamma_ik = pi_uk exp(-diff2_ik) / sum_j pi_uj exp(-diff2_ij)
    log L_i  = log sum_k pi_uk exp(-diff2_ik) - sum_{m in E} log(2 pi sigma2_u(shell m))

``X`` is the recentred particle image masked by a soft circle of the particle diameter
(background zero, RELION ``--zero_mask``), ``E`` the half-plane pixels within the E-step radius
(``min`` of the current resolution + ``incr_size`` shells and ``--strict_highres_exp``) but
the origin (RELION's ``Minvsigma2`` is 0 at shell 0: likelihoods invariant to additive offsets),
``sigma2`` the per-shell noise power per real/imaginary component (the 1/2 factor is
RELION's). Everything is vectorised over particles, replicates and classes: one row per
(particle, replicate) pair the particle belongs to, all ``K`` classes at once; the
interpolation corners of each particle's pose are computed once and shared by every map.

The weighted residual power per shell, ``sum_k gamma_ik |X - CTF V_k|^2`` (with the map zero
beyond each replicate's current size, as RELION projects it), feeds the noise update.

Example usage::

    bs = batch_spectra(batch, points, m, mask, spectra_size=2 * D, pad=2.0, use_ctf=True)
    out = expectation(bs, pair_particle, pair_replicate, state, with_residual=True)
    out["posterior"]                    # (P, K)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hetero.models.class3d.points import HalfPlanePoints, gather_points, point_corners
from hetero.models.components.renderer import recenter_images
from hetero.physics.ctf import ctf_table_compute
from hetero.physics.fourier import fft2_centered
from hetero.physics.projection import volume_rfft


@dataclass
class BatchSpectra:
    """Per-batch inputs of the E-step, computed once whatever the number of maps.

    ``x (B, M)`` complex64 masked, recentred image spectrum at the first ``M`` points;
    ``ctf (B, M)`` float32; ``power (B, n_shells)`` float32 ``sum |x|^2`` per shell over *all*
    half-plane points; ``x_all (B, M_all)`` all points (kept only when asked for);
    ``idx, w, conj (B, M, 8)`` the interpolation corners of each pose (:func:`point_corners`).
    """

    x: Tensor
    ctf: Tensor
    power: Tensor
    idx: Tensor
    w: Tensor
    conj: Tensor
    x_all: Tensor | None = None


def batch_spectra(
    batch: dict[str, Tensor],
    points: HalfPlanePoints,
    n_points: int,
    image_mask: Tensor | None,
    spectra_size: int,
    pad: float,
    use_ctf: bool,
    keep_all: bool = False,
) -> BatchSpectra:
    """Image spectra, CTF and pose corners of one batch (float32, autocast-safe).

    :param n_points: number of leading points used by the E-step (largest radius needed).
    :param image_mask: ``(D, D)`` real-space mask applied to the recentred images, or ``None``.
    :param spectra_size, pad: geometry of the map half spectra (:func:`volume_rfft`).
    :param use_ctf: multiply projections by the batch's CTF (else 1).
    :param keep_all: also return the spectrum at every half-plane point (``x_all``).
    """
    with torch.autocast(batch["image"].device.type, enabled=False):
        images = recenter_images(batch["image"].float(), batch["origin_px"].float())
        if image_mask is not None:
            images = images * image_mask
        spectra = fft2_centered(images).to(torch.complex64)
        x_all = points.take(spectra)
        shells = points.shell.to(images.device)
        power = images.new_zeros(images.shape[0], points.n_shells)
        power.index_add_(1, shells, x_all.real**2 + x_all.imag**2)
        if use_ctf:
            ctf = ctf_table_compute(batch["ctf"].float(), points.box_size, batch["apix"].float())
            ctf = points.take(ctf, n_points).float()
        else:
            ctf = images.new_ones(images.shape[0], n_points)
        idx, w, conj = point_corners(batch["rotation"].float(), points.coords[:n_points], spectra_size, pad)
    return BatchSpectra(x_all[:, :n_points], ctf, power, idx, w, conj, x_all if keep_all else None)


@dataclass
class ExpectationState:
    """What the E-step needs of the current model (all on the batch's device).

    ``flat_spectra``: every class map's half spectrum (``U * K`` maps, replicate-major),
    flattened; ``map_numel``: elements per map spectrum; ``inv_sigma2 (U, M)``: ``1/sigma2`` of
    each point's shell, 0 beyond the replicate's E-step radius; ``fine (U, M)`` bool: points
    within the replicate's current size; ``log_prior (U, K)`` (``-inf`` for empty classes);
    ``log_norm (U,)``: ``sum_{E} log(2 pi sigma2)``; ``shell (M,)``: shells of the points.
    """

    flat_spectra: Tensor
    map_numel: int
    n_classes: int
    inv_sigma2: Tensor
    fine: Tensor
    log_prior: Tensor
    log_norm: Tensor
    shell: Tensor
    n_shells: int


def expectation_state(
    maps: Tensor, sigma2: Tensor, prior: Tensor, radius: Tensor, points: HalfPlanePoints, strict: int, pad: int,
) -> tuple[ExpectationState, Tensor]:
    """The E-step's view of the model: the maps' half spectra and per-replicate weights.

    :param maps: ``(U, K, D, D, D)``; :param sigma2: ``(U, S)`` noise power per shell;
    :param prior: ``(U, K)``; :param radius: ``(U,)`` current size radius (shells);
    :param strict: the E-step limit (shells, ``--strict_highres_exp``); :param pad: oversampling.
    :return: the state and ``(U,)`` float64 number of Fourier pixels in each replicate's E-step.

    RELION leaves the origin out of the likelihood (``Minvsigma2`` is 0 at ires 0: invariance
    to additive offsets; the maps' mean is poorly determined, the CTF being small there).
    """
    u, k, d = maps.shape[:2] + maps.shape[-1:]
    with torch.autocast(maps.device.type, enabled=False):
        spectra = volume_rfft(maps.float().reshape(u * k, d, d, d), pad)
    coarse = torch.clamp(radius, max=strict)
    m = points.count_within(int(radius.max()))
    shell = points.shell[:m].to(maps.device)
    in_e = (shell[None, :] <= coarse[:, None]) & (shell[None, :] > 0)
    s2 = sigma2[:, shell]
    used = in_e & (s2 > 0)
    inv = torch.where(used, 1.0 / s2.clamp(min=1e-300), 0.0)
    log_norm = torch.where(used, torch.log(2 * math.pi * s2.clamp(min=1e-300)), 0.0).sum(1)
    state = ExpectationState(
        flat_spectra=spectra.reshape(-1).to(torch.complex64), map_numel=spectra[0].numel(), n_classes=k,
        inv_sigma2=inv.float(), fine=shell[None, :] <= radius[:, None],
        log_prior=torch.log(prior).float(), log_norm=log_norm, shell=shell, n_shells=d // 2 + 1,
    )
    return state, used.sum(1).double().clamp(min=1)


def expectation(
    bs: BatchSpectra,
    pair_particle: Tensor,
    pair_replicate: Tensor,
    st: ExpectationState,
    with_residual: bool = False,
    chunk_elements: int = 1 << 22,
) -> dict[str, Tensor]:
    """Posteriors of each (particle, replicate) pair over the replicate's ``K`` classes.

    :param pair_particle: ``(P,)`` row of each pair in the batch.
    :param pair_replicate: ``(P,)`` replicate of each pair.
    :param with_residual: also return ``residual (P, n_shells)``: the posterior-weighted
        residual power per shell over the points of ``bs`` (shells beyond the points are the
        caller's, from ``bs.power``).
    :param chunk_elements: pairs are processed in chunks of about this many ``(K, M)`` values.
    :return: ``posterior (P, K)`` float32, ``diff2 (P, K)``, ``loglik (P,)`` float64.
    """
    k, m = st.n_classes, bs.x.shape[1]
    n = pair_particle.shape[0]
    step = max(1, chunk_elements // max(1, k * m))
    classes = torch.arange(k, device=bs.x.device)
    post, diff2, loglik, residual = [], [], [], []
    for s in range(0, n, step):
        i, u = pair_particle[s : s + step], pair_replicate[s : s + step]
        offsets = (u[:, None] * k + classes[None]) * st.map_numel
        proj = gather_points(st.flat_spectra, offsets, bs.idx[i], bs.w[i], bs.conj[i])
        proj = proj * st.fine[u][:, None, :]
        d = bs.x[i][:, None, :] - bs.ctf[i][:, None, :] * proj
        e = d.real**2 + d.imag**2                                            # (c, K, M)
        d2 = 0.5 * (e * st.inv_sigma2[u][:, None, :]).sum(-1)
        logits = st.log_prior[u] - d2
        g = torch.softmax(logits, -1)
        post.append(g)
        diff2.append(d2)
        loglik.append(torch.logsumexp(logits.double(), -1) - st.log_norm[u])
        if with_residual:
            r = (g[:, :, None] * e).sum(1)                                   # (c, M)
            res = r.new_zeros(r.shape[0], st.n_shells)
            residual.append(res.index_add_(1, st.shell[:m], r))
    empty = bs.x.new_zeros(0, k, dtype=torch.float32)
    out = {
        "posterior": torch.cat(post) if post else empty,
        "diff2": torch.cat(diff2) if diff2 else empty,
        "loglik": torch.cat(loglik) if loglik else empty.new_zeros(0, dtype=torch.float64),
    }
    if with_residual:
        out["residual"] = torch.cat(residual) if residual else empty.new_zeros(0, st.n_shells)
    return out


def significant(posterior: Tensor, fraction: float) -> Tensor:
    """RELION's significant weights: per row, keep the largest posteriors until their sum
    reaches ``fraction`` of the row's total (``adaptive_fraction``, 0.999); zero the rest.
    The kept weights are not renormalised (RELION divides by the full sum)."""
    if fraction >= 1.0:
        return posterior
    vals, order = torch.sort(posterior, dim=-1, descending=True)
    before = torch.cumsum(vals, -1) - vals
    keep_sorted = before < fraction * posterior.sum(-1, keepdim=True)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return posterior * keep


def pair_rows(members: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, U)`` bool membership of a batch -> ``(pair_particle, pair_replicate)`` rows of the
    pairs (particle-major)."""
    nz = torch.nonzero(members, as_tuple=False)
    return nz[:, 0], nz[:, 1]
