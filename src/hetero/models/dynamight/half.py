"""One half set's VAE: encoder, deformation decoder and its own consensus Gaussians, and the
image-formation and loss of a batch of that half's particles (DynaMight eqs. 1-4)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hetero.losses.kl import gaussian_kl
from hetero.losses.whitening import whitened_squared_error
from hetero.models.dynamight.consensus import GaussianConsensus
from hetero.models.dynamight.decoder import DeformationDecoder
from hetero.models.dynamight.encoder import HalfSetEncoder
from hetero.physics.gaussians import SPLAT_SIGMA_PX, project_gaussians


@dataclass
class PreparedBatch:
    """What every half needs from a batch, computed once (float32).

    ``target``: ``(B, D, D//2+1)`` rfft2 of the recentred images; ``encoder_input``: ``(B, D, D)``
    masked recentred images; ``ctf``: ``(B, D, D)`` centred CTF or ``None``; ``rotations``
    ``(B, 3, 3)``; ``index`` ``(B,)``; ``half`` ``(B,)``.
    """

    target: Tensor
    encoder_input: Tensor
    ctf: Tensor | None
    rotations: Tensor
    index: Tensor
    half: Tensor

    def select(self, mask: Tensor) -> PreparedBatch:
        return PreparedBatch(self.target[mask], self.encoder_input[mask],
                             None if self.ctf is None else self.ctf[mask], self.rotations[mask],
                             self.index[mask], self.half[mask])

    def __len__(self) -> int:
        return int(self.index.shape[0])


class HalfSetVAE(nn.Module):
    """Encoder + deformation decoder + consensus of one half set.

    :param box_size: training box ``D``. :param apix: its pixel size. :param zdim: latent size.
    :param n_gaussians: consensus Gaussians. :param encoder: kwargs of :class:`HalfSetEncoder`.
    :param decoder: kwargs of :class:`DeformationDecoder`. :param consensus: kwargs of
        :class:`GaussianConsensus`. :param splat_sigma_px: renderer split (see
        :func:`hetero.physics.gaussians.project_gaussians`).
    """

    def __init__(self, box_size: int, apix: float, zdim: int, n_gaussians: int,
                 encoder: dict | None = None, decoder: dict | None = None,
                 consensus: dict | None = None, splat_sigma_px: float | None = SPLAT_SIGMA_PX) -> None:
        super().__init__()
        self.box_size, self.apix = int(box_size), float(apix)
        self.encoder = HalfSetEncoder(box_size, zdim, **(encoder or {}))
        self.decoder = DeformationDecoder(zdim, box_size, **(decoder or {}))
        self.consensus = GaussianConsensus(n_gaussians, box_size, apix, **(consensus or {}))
        self.splat_sigma_px = splat_sigma_px

    # ------------------------------------------------------------------ model pieces
    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, D, D)`` masked images -> ``mu, log sigma`` float32."""
        mu, logstd = self.encoder(images)
        return mu.float(), logstd.float()

    def displacements(self, z: Tensor, coords: Tensor | None = None) -> Tensor:
        """``(B, N, 3)`` displacements ``delta(z, c)`` in box fractions, float32, at the consensus
        (or at ``coords`` ``(N, 3)`` / ``(B, N, 3)`` box fractions)."""
        c = self.consensus.positions if coords is None else coords
        return self.decoder(z, c).float()

    def deformed(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(positions, displacements)`` ``(B, N, 3)`` box fractions: ``c + delta(z, c)``."""
        delta = self.displacements(z)
        return self.consensus.positions.float() + delta, delta

    def render(self, positions: Tensor, rotations: Tensor, ctf: Tensor | None,
               shifts_px: Tensor | None = None) -> Tensor:
        """rfft2 half spectra ``(B, D, D//2+1)`` of the centred images of ``positions`` (box
        fractions, ``(N, 3)`` or ``(B, N, 3)``) at ``rotations`` with ``ctf`` (float32)."""
        c = self.consensus
        return project_gaussians(
            c.positions_angstrom(positions), c.sigma_angstrom(), c.amplitudes(), rotations,
            self.box_size, self.apix, shifts_px=shifts_px, ctf=ctf,
            splat_sigma_px=self.splat_sigma_px, return_spectrum=True,
        )

    # ------------------------------------------------------------------ losses
    def losses(
        self,
        batch: PreparedBatch,
        deform: bool,
        weights: Tensor | None,
        kl_weight: float,
        regularizer=None,
        graph=None,
        reg_weight: float = 0.0,
        sample: bool = True,
        rotations: Tensor | None = None,
        shifts_px: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-batch terms of ``L = L_data + beta KL + lambda R`` for this half's particles.

        :param deform: apply the decoder (``False`` in warm-up: the consensus is rendered).
        :param weights: whitening weights ``(D, D//2+1)`` or ``None``.
        :param regularizer: :class:`~hetero.losses.geometric.GeometricRegularization` or ``None``.
        :return: ``total``, ``data``, ``kl``, ``geometric`` (unweighted), ``mu``, ``z``,
            ``deformation`` ``(B,)`` mean displacement (Å) and the model spectra ``predicted``.
        """
        rot = batch.rotations if rotations is None else rotations
        zero = batch.target.real.new_zeros(())
        out = {"kl": zero, "geometric": zero}
        if deform:
            mu, logstd = self.encode(batch.encoder_input)
            z = mu + torch.randn_like(mu) * logstd.exp() if sample else mu
            positions, delta = self.deformed(z)
            out["kl"] = gaussian_kl(mu, logstd).mean()
            out.update(mu=mu, z=z)
            out["deformation"] = delta.detach().norm(dim=-1).mean(-1) * self.consensus.extent_angstrom
            if regularizer is not None and graph is not None and reg_weight > 0:
                geo = regularizer(self.consensus.positions_angstrom(positions), graph)
                out["geometric"] = geo["total"]
        else:
            positions = self.consensus.positions
        predicted = self.render(positions, rot, batch.ctf, shifts_px)
        out["data"] = whitened_squared_error(predicted, batch.target, self.box_size, weights).mean()
        out["total"] = out["data"] + kl_weight * out["kl"] + reg_weight * out["geometric"]
        out["predicted"] = predicted
        return out


def kl_weight(kld_factor: float, box_size: int) -> float:
    """The reference's ``beta = kld_factor / D^2`` (data term is a per-pixel mean)."""
    return float(kld_factor) / float(box_size) ** 2


def phase_ramp_rfft(shifts_px: Tensor, size: int) -> Tensor:
    """``(B, D, D//2+1)`` multipliers translating images by ``shifts_px`` ``(B, 2)`` = (tx, ty)
    in rfft2 layout (``out(r) = in(r - t)``)."""
    ky = torch.fft.fftfreq(size, device=shifts_px.device, dtype=torch.float32)
    kx = torch.fft.rfftfreq(size, device=shifts_px.device, dtype=torch.float32)
    t = shifts_px.float()
    phase = -2 * math.pi * (kx[None, None, :] * t[:, 0, None, None] + ky[None, :, None] * t[:, 1, None, None])
    return torch.polar(torch.ones_like(phase), phase)
