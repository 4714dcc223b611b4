"""``model=opusdsd``: OPUS-DSD (Luo et al., Nat. Methods 2023) as a :class:`HeteroModel`.

Per training step (all batched, no loop over images):

1. Targets: particle images recentred by their consensus origin (:meth:`HeteroModel.targets`).
2. Augmentation (paper "Data augmentation", eq. 8): independent random B-factors
   ``b ~ U[-bfactor, bfactor]`` for the encoder input and the reconstruction target, applied
   as ``exp(-b pi^2 s^2)`` with ``s`` in cycles/pixel of the training box (so ``b`` is in
   px^2; RELION's ``B = 4 pi^2 b apix^2`` in Å^2, e.g. ``b = 0.5`` at 4 Å/px is ~316 Å^2), and
   a contrast factor ``U[0.75, 1.25]`` on the encoder input only.
3. Encoder (:class:`ImageEncoder`): input Fourier-resampled to the encoder cube ``C``,
   extruded and rotated into the consensus frame, masked, 3-D convs -> ``mu, log sigma``.
4. ``z = mu + sigma * eps``; decoder -> ``(B, T, T, T)`` template volumes.
5. Render at the consensus pose plus neighbouring poses (:mod:`.poses`) with the base class
   renderer and CTF; multi-pose reconstruction loss (paper eq. 9).
6. Regularisers: beta-KL weighted by ``weight * SNR * beta(images seen)``; the structural
   disentanglement prior (eqs. 5-7) with interclass comparisons against the memory bank;
   TV and L1 on the decoded volumes. Per-image terms are divided by the number of scored
   pixels, like the reconstruction term (see :mod:`hetero.losses.reconstruction`).
7. Bookkeeping without gradient: memory-bank momentum update and running-SNR update, both
   with statistics gathered over DDP ranks so every rank holds the same state;
   ``images_seen`` (the beta schedule's clock) is summed over ranks.

Validation logs ``val/loss``: the per-pixel mean squared error between the (un-augmented)
recentred image and the rendering of ``decode(mu)`` at the consensus pose.

Rendering, augmentation and all losses run in float32 with autocast disabled; only the
encoder/decoder convolutions follow ``trainer.precision`` (e.g. ``bf16-mixed``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hetero.losses.disentanglement import StructuralDisentanglementPrior
from hetero.losses.kl import KLDivergence
from hetero.losses.reconstruction import MultiPoseReconstructionLoss
from hetero.losses.snr import RunningSNR, batch_power
from hetero.losses.volume_priors import L1Norm, TotalVariation
from hetero.models.base import HeteroModel
from hetero.models.components.renderer import has_ctf
from hetero.models.opusdsd.decoder import VolumeDecoder
from hetero.models.opusdsd.encoder import ImageEncoder
from hetero.models.opusdsd.memory_bank import MemoryBank
from hetero.models.opusdsd.poses import HEALPIX_NSIDE16_DEG, neighbour_rotations
from hetero.physics.ctf import ctf_table_compute
from hetero.physics.fourier import fft2_centered, fourier_crop_2d, frequency_grid_2d, ifft2_centered
from hetero.physics.masks import circular_mask
from hetero.utils.config import checked_number

TERM_NAMES = ("reconstruction", "kl", "disentanglement", "tv", "l1")


def default_loss_terms() -> dict[str, nn.Module]:
    """The paper's terms and weights (what ``conf/loss/opusdsd.yaml`` instantiates)."""
    return {
        "reconstruction": MultiPoseReconstructionLoss(),
        "kl": KLDivergence(),
        "disentanglement": StructuralDisentanglementPrior(),
        "tv": TotalVariation(),
        "l1": L1Norm(),
    }


def _plain(value: Any) -> Any:
    """OmegaConf containers / tuples -> plain Python (checkpoint hparams load with weights_only)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


class OpusDSD(HeteroModel):
    """OPUS-DSD: 3-D conv VAE with multi-pose reconstruction and a structural prior.

    :param box_size: training box ``D``. :param apix: its pixel size (Å).
    :param template_size: decoded volume side ``T`` (default ``D``).
    :param loss: dict of loss-term modules (``conf/loss/opusdsd.yaml``); ``None`` uses the paper
        defaults; a term set to ``None`` is switched off (``reconstruction`` is required).
    :param kl_schedule: callable ``beta(position)`` with attribute ``unit`` (``"images"`` or
        ``"steps"``); ``None`` means beta = 1.
    :param zdim: latent size.
    :param encoder_size: encoder cube ``C`` (default ``D``); images are Fourier-resampled to it.
    :param encoder_channels: conv widths. :param fc_width: encoder FC width.
    :param encoder_resample_size: cube side before the last three encoder convs.
    :param encoder_mask_radius: encoder sphere radius as a fraction of ``C / 2``.
    :param encoder_phase_flip: multiply the encoder input's spectrum by ``sign(CTF)`` (hetero's
        addition; the paper and reference feed raw images). The pseudo-volumes of particles at
        different defoci then agree in sign, which shortens the phase in which the decoder
        ignores ``z``; the reconstruction target and loss are unchanged.
    :param decoder_channels: seed channels then upsampling widths.
    :param decoder_fc_width: decoder hidden FC width.
    :param decoder_resample_layers: upsampling layers after the intermediate resampling.
    :param decoder_output_gain: init gain of the decoder output layer.
    :param n_neighbour_poses: neighbours rendered around the consensus pose.
    :param neighbour_spread_deg: their angular distance. :param neighbour_mode: ``ring``/``random``.
    :param include_consensus: also score the consensus pose (the reference does not).
    :param augment: enable training augmentation.
    :param bfactor_input: half-range of the encoder-input B-factor (px^2, paper 0.5).
    :param bfactor_target: half-range of the target B-factor (px^2, paper 0.5).
    :param contrast_range: ``[lo, hi]`` of the encoder-input contrast factor.
    :param bank_momentum: memory-bank momentum. :param bank_first_visit_copy: see
        :class:`MemoryBank`. :param update_bank_on_val: validation also updates the bank.
    :param snr_initial: initial SNR. :param snr_rate: SNR EMA rate.
    :param snr_reset_each_epoch: reset the SNR estimate every epoch (reference).
    :param recon_mask_radius: score only pixels within this fraction of ``D / 2`` (``None``:
        the whole box).
    :param encoder_logstd_max: upper bound on the encoder's ``log sigma`` (a clamp, hetero's
        numerical guard: ``exp(2 log sigma)`` of an encoder overfitted at lr 1e-3 overflowed
        the gradient); ``None``: unbounded (paper, reference). A posterior wider than the
        ``N(0, 1)`` prior is never optimal; the demo run's largest value was 0.8.
    :param optimizer: partial optimiser. :param scheduler: partial LR scheduler.
    :param data_info: ``n_particles`` (required) and other plain geometry values.
    """

    method = "opusdsd"
    embedding_key = "z_mu"
    embedding_name = "z"

    def __init__(
        self,
        box_size: int,
        apix: float,
        template_size: int | None = None,
        loss: Mapping[str, Any] | None = None,
        kl_schedule: Callable[[float], float] | None = None,
        zdim: int = 8,
        encoder_size: int | None = None,
        encoder_channels: list[int] | tuple[int, ...] = (32, 64, 128, 256, 512, 1024),
        fc_width: int = 512,
        encoder_resample_size: int = 12,
        encoder_mask_radius: float = 1.0,
        encoder_phase_flip: bool = True,
        decoder_channels: list[int] | tuple[int, ...] = (2048, 1024, 512, 256, 128, 64, 32, 16),
        decoder_fc_width: int = 512,
        decoder_resample_layers: int = 4,
        decoder_output_gain: float = 1.0,
        n_neighbour_poses: int = 8,
        neighbour_spread_deg: float = HEALPIX_NSIDE16_DEG,
        neighbour_mode: str = "ring",
        include_consensus: bool = True,
        augment: bool = True,
        bfactor_input: float = 0.5,
        bfactor_target: float = 0.5,
        contrast_range: list[float] | tuple[float, float] = (0.75, 1.25),
        bank_momentum: float = 0.7,
        bank_first_visit_copy: bool = True,
        update_bank_on_val: bool = False,
        snr_initial: float = 0.01,
        snr_rate: float = 0.01,
        snr_reset_each_epoch: bool = False,
        recon_mask_radius: float | None = None,
        encoder_logstd_max: float | None = 2.0,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        render_method: str = "fourier",
        **data_info,
    ) -> None:
        super().__init__(
            box_size, apix, template_size, optimizer, scheduler, render_method, **data_info
        )
        n_particles = data_info.get("n_particles")
        if n_particles is None:
            raise ValueError("OpusDSD needs n_particles (the memory bank has one row per particle)")
        hparams = {
            k: _plain(v)
            for k, v in locals().items()
            if k not in ("self", "loss", "kl_schedule", "optimizer", "scheduler", "data_info", "__class__")
        }
        hparams.update({k: v for k, v in data_info.items() if isinstance(v, int | float | bool | str)})
        self.save_hyperparameters(hparams)

        self.latent_dim = int(zdim)
        self.encoder_size = int(encoder_size or self.box_size)
        self.encoder = ImageEncoder(
            self.encoder_size, zdim, _plain(encoder_channels), fc_width, encoder_resample_size,
            encoder_mask_radius,
        )
        self.decoder = VolumeDecoder(
            zdim, self.template_size, _plain(decoder_channels), decoder_fc_width,
            decoder_resample_layers, decoder_output_gain,
        )
        self.bank = MemoryBank(int(n_particles), zdim, bank_momentum, bank_first_visit_copy)
        self.snr = RunningSNR(snr_initial, snr_rate)
        self.register_buffer("images_seen", torch.tensor(0, dtype=torch.long))

        terms = default_loss_terms() if loss is None else dict(loss.items())
        if terms.get("reconstruction") is None:
            terms["reconstruction"] = MultiPoseReconstructionLoss()
        self.loss_terms = nn.ModuleDict({k: v for k, v in terms.items() if isinstance(v, nn.Module)})
        self._plain_terms = {k: v for k, v in terms.items() if v is not None and not isinstance(v, nn.Module)}
        self.kl_schedule = kl_schedule

        self.n_neighbour_poses = int(n_neighbour_poses)
        self.neighbour_spread_deg = float(neighbour_spread_deg)
        self.neighbour_mode = neighbour_mode
        self.include_consensus = bool(include_consensus)
        self.augment = bool(augment)
        self.bfactor_input, self.bfactor_target = float(bfactor_input), float(bfactor_target)
        self.contrast_range = tuple(float(c) for c in _plain(contrast_range))
        self.update_bank_on_val = bool(update_bank_on_val)
        self.encoder_phase_flip = bool(encoder_phase_flip)
        self.snr_reset_each_epoch = bool(snr_reset_each_epoch)
        self.encoder_logstd_max = None if encoder_logstd_max is None else checked_number(
            encoder_logstd_max, "model.encoder_logstd_max", hint=" (0: sigma at most the prior's) or null")
        sx, sy = frequency_grid_2d(self.box_size, 1.0)
        self.register_buffer("freq2", sx**2 + sy**2, persistent=False)
        mask = None if recon_mask_radius is None else circular_mask(self.box_size, recon_mask_radius * self.box_size / 2)
        self.register_buffer("recon_mask", mask, persistent=False)

    # ------------------------------------------------------------------ interface
    def term(self, name: str):
        """The loss term ``name`` or ``None`` when switched off."""
        if name in self.loss_terms:
            return self.loss_terms[name]
        return self._plain_terms.get(name)

    @torch.no_grad()
    def encode(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Posterior ``{"z_mu", "z_logstd"}`` ``(B, zdim)`` of un-augmented recentred images."""
        target = self.targets(batch)
        mu, logstd = self._posterior(self._encoder_input(target, batch), batch["rotation"].float())
        return {"z_mu": mu, "z_logstd": logstd}

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """``(K, zdim) -> (K, T, T, T)`` float32 template volumes."""
        return self.decoder(z.to(self.device, torch.float32)).float()

    def extra_outputs(self) -> dict[str, np.ndarray]:
        """The memory bank (``(N, zdim)``, the reference's analysed latents) and which rows have
        been updated at least once."""
        return {
            "memory_bank": self.bank.codes.detach().float().cpu().numpy(),
            "memory_bank_seen": self.bank.seen.detach().cpu().numpy(),
        }

    # ------------------------------------------------------------------ pieces
    def _encoder_image(self, images: Tensor) -> Tensor:
        if images.shape[-1] == self.encoder_size:
            return images
        return fourier_crop_2d(images, self.encoder_size)

    def _phase_flip_sign(self, batch: dict[str, Tensor]) -> Tensor | None:
        """``sign(CTF)`` ``(B, D, D)`` (centred) when the encoder input is phase-flipped."""
        if not self.encoder_phase_flip or not has_ctf(batch["ctf"]):
            return None
        ctf = ctf_table_compute(batch["ctf"].float(), self.box_size, batch["apix"].float())
        return torch.sign(ctf)

    def _encoder_input(self, target: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Un-augmented encoder input: phase-flipped (optional) and resampled to ``C``."""
        sign = self._phase_flip_sign(batch)
        if sign is not None:
            target = ifft2_centered(fft2_centered(target) * sign).real
        return self._encoder_image(target)

    def _augment(self, target: Tensor, flip_sign: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(encoder input (B, C, C), reconstruction target (B, D, D))`` with independent random
        B-factors and an input contrast factor; ``flip_sign`` phase-flips the encoder input."""
        b = target.shape[0]
        spec = fft2_centered(target)
        u = torch.rand(3, b, device=target.device)
        b_in = (2 * u[0] - 1) * self.bfactor_input
        b_t = (2 * u[1] - 1) * self.bfactor_target
        lo, hi = self.contrast_range
        contrast = lo + (hi - lo) * u[2]
        k = -(torch.pi**2) * self.freq2
        env_in = torch.exp(b_in[:, None, None] * k) * contrast[:, None, None]
        env_t = torch.exp(b_t[:, None, None] * k)
        if flip_sign is not None:
            env_in = env_in * flip_sign
        enc = ifft2_centered(spec * env_in).real
        tgt = ifft2_centered(spec * env_t).real
        return self._encoder_image(enc), tgt

    def _posterior(self, images: Tensor, rotations: Tensor) -> tuple[Tensor, Tensor]:
        """Float32 ``(mu, log sigma)`` ``(B, zdim)``, log sigma bounded by ``encoder_logstd_max``."""
        mu, logstd = self.encoder(images, rotations)
        mu, logstd = mu.float(), logstd.float()
        if self.encoder_logstd_max is not None:
            logstd = logstd.clamp(max=self.encoder_logstd_max)
        return mu, logstd

    def _poses(self, rotations: Tensor) -> Tensor:
        return neighbour_rotations(
            rotations, self.n_neighbour_poses, self.neighbour_spread_deg, self.neighbour_mode,
            self.include_consensus,
        )

    def _schedule_beta(self) -> float:
        if self.kl_schedule is None:
            return 1.0
        unit = getattr(self.kl_schedule, "unit", "steps")
        x = float(self.images_seen) if unit == "images" else float(self.global_step)
        return float(self.kl_schedule(x))

    def _world_size(self) -> int:
        trainer = self._trainer
        return int(trainer.world_size) if trainer is not None else 1

    def _gather_rows(self, *tensors: Tensor) -> list[Tensor]:
        """Concatenate per-rank ``(B_r, ...)`` tensors over DDP ranks (``B_r`` may differ)."""
        if self._world_size() <= 1:
            return list(tensors)
        b = tensors[0].shape[0]
        sizes = self.all_gather(torch.tensor([b], device=self.device)).reshape(-1).tolist()
        m = max(sizes)
        out = []
        for t in tensors:
            padded = torch.cat([t, t.new_zeros((m - b, *t.shape[1:]))]) if m > b else t
            g = self.all_gather(padded.contiguous())
            out.append(torch.cat([g[r, : sizes[r]] for r in range(len(sizes))]))
        return out

    @torch.no_grad()
    def _update_bank(self, batch: dict[str, Tensor], mu: Tensor) -> int:
        index, mu_all, classes = self._gather_rows(batch["index"], mu.detach().float(), batch["pose_class"])
        self.bank.update(index, mu_all, classes)
        return int(index.shape[0])

    # ------------------------------------------------------------------ training
    def _training_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        target = self.targets(batch)
        rotations = batch["rotation"].float()
        if self.augment:
            enc_image, rec_target = self._augment(target, self._phase_flip_sign(batch))
        else:
            enc_image, rec_target = self._encoder_input(target, batch), target
        mu, logstd = self._posterior(enc_image, rotations)
        z = mu + torch.randn_like(mu) * logstd.exp()
        volumes = self.decoder(z).float()

        with torch.autocast(self.device.type, enabled=False):
            predicted = self.render(volumes, self._poses(rotations), batch)
            rec = self.term("reconstruction")(predicted, rec_target, self.recon_mask, self.snr.noise_var)
            n_pix = rec["n_pix"]
            snr, beta = float(self.snr.snr), self._schedule_beta()
            out = {"reconstruction": self.term("reconstruction").weight * rec["loss"]}
            logs = {"beta": torch.tensor(beta), "snr": self.snr.snr.detach().clone(),
                    "noise_var": self.snr.noise_var.detach().clone()}
            kl = self.term("kl")
            if kl is not None:
                value = kl(mu, logstd)
                out["kl"] = kl.effective_weight(snr, beta) * value / n_pix
                logs["kl_nats"] = value.detach()
            prior = self.term("disentanglement")
            if prior is not None:
                codes, classes = self.bank.sample(prior.n_samples)
                parts = prior(mu, batch["pose_class"], codes, classes)
                out["disentanglement"] = prior.effective_weight(snr, beta) * parts["total"] / n_pix
                logs.update({f"prior/{k}": v.detach() for k, v in parts.items() if k != "total"})
            for name in ("tv", "l1"):
                reg = self.term(name)
                if reg is not None:
                    out[name] = reg.weight * reg(volumes) / n_pix
            out["total"] = sum(out.values())

            signal, residual = batch_power(predicted, rec_target, rec["weights"], self.recon_mask)
        self._bookkeeping(batch, mu, signal, residual, n_pix)
        out["_logs"] = logs
        return out

    @torch.no_grad()
    def _bookkeeping(self, batch, mu: Tensor, signal: Tensor, residual: Tensor, n_pix: Tensor) -> None:
        n_seen = self._update_bank(batch, mu)
        stats = torch.stack([signal, residual])
        if self._world_size() > 1:
            stats = self.all_gather(stats).reshape(-1, 2).mean(0)
        self.snr.update(stats[0], stats[1], n_pix)
        self.images_seen += n_seen

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self._training_losses(batch)
        logs = out.pop("_logs")
        bs = batch["image"].shape[0]
        self.log("train/loss", out["total"], prog_bar=True, batch_size=bs)
        for name, value in out.items():
            if name != "total":
                self.log(f"train/loss/{name}", value, batch_size=bs)
        for name, value in logs.items():
            self.log(f"train/{name}", value, batch_size=bs)
        return out["total"]

    def on_train_epoch_start(self) -> None:
        if self.snr_reset_each_epoch:
            self.snr.reset()

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        target = self.targets(batch)
        rotations = batch["rotation"].float()
        mu, _ = self.encoder(self._encoder_input(target, batch), rotations)
        volumes = self.decoder(mu).float()
        with torch.autocast(self.device.type, enabled=False):
            predicted = self.render(volumes, rotations, batch)
            sq = (predicted - target) ** 2
            if self.recon_mask is not None:
                error = (sq * self.recon_mask).sum((-2, -1)).mean() / self.recon_mask.sum()
            else:
                error = sq.mean()
        bs = batch["image"].shape[0]
        self.log("val/loss", error, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=bs)
        if self.update_bank_on_val:
            self._update_bank(batch, mu.float())
