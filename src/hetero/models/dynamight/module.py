"""``model=dynamight``: DynaMight (Schwab et al., Nat. Methods 2024), forward deformations.

Two independent VAEs, one per half set (:class:`~hetero.models.dynamight.half.HalfSetVAE`:
encoder, deformation decoder, consensus Gaussians), trained in one LightningModule:

- every training batch is split by ``batch["half"]``; each half's particles only reach that
  half's networks and consensus (``L_h = L_data + beta KL + lambda_h R``);
- validation particles (``data.val_fraction``) train both encoders only, before each epoch
  (:mod:`.epoch`); Lightning's validation loop scores them and aligns the two latent spaces;
- per-epoch tasks (:mod:`.epoch`): noise whitening, update-rate checks, consensus
  re-estimation, radius graphs, the balancing of lambda, optional pose refinement.

Manual optimisation with one Adam over six parameter groups (encoder, decoder, consensus per
half), learning rates set per phase (:class:`~hetero.models.dynamight.schedule.DynaMightSchedule`).
Gradients are summed over DDP ranks explicitly (:mod:`.distributed`), weighted by each half's
particle count, so both halves' parameters and every buffer (consensus, lambda, whitening,
update rates, pools) stay identical on all ranks and are checkpointed. Networks follow
``trainer.precision`` (``bf16-mixed``); the renderer and losses run in float32.

Per-particle outputs (``predict_step``): ``z_mu`` in one latent space for all particles (each
particle encoded by its own half's encoder; half-set-2 latents mapped into half-set-1
coordinates by the affine map fitted on the validation particles, which both encoders
encode), ``z_logstd``, the raw ``z_mu_half1`` / ``z_mu_half2`` of both encoders for every
particle, ``half``, and the deformation RMSD / maximum (Å) by the particle's own half.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hetero.losses.geometric import GeometricRegularization
from hetero.models.base import HeteroModel
from hetero.models.components.renderer import has_ctf
from hetero.models.dynamight import alignment as A
from hetero.models.dynamight import epoch as E
from hetero.models.dynamight.half import HalfSetVAE, PreparedBatch, kl_weight, phase_ramp_rfft
from hetero.models.dynamight.initialization import initialize_consensus
from hetero.models.dynamight.schedule import DynaMightSchedule
from hetero.models.opusdsd.module import _plain
from hetero.physics.ctf import ctf_table_compute
from hetero.physics.gaussians import centered_to_rfft
from hetero.physics.masks import circular_mask
from hetero.utils.config import checked_number
from hetero.utils.errors import ConfigError
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)

GROUPS = ("encoder", "decoder", "consensus")


class DynaMight(HeteroModel):
    """DynaMight forward deformations; see the module docstring and ``conf/model/dynamight.yaml``
    for every parameter (names and defaults there are the documentation)."""

    method = "dynamight"
    embedding_key = "z_mu"
    #: ``pool_score`` holds ``inf`` ("no particle pooled yet") at every epoch start: not a NaN
    #: the checkpoint callbacks should refuse (:mod:`hetero.callbacks.checkpoint`)
    nonfinite_buffers = ("pool_score",)
    analysis_steps = (
        "hetero.models.dynamight.steps.pseudo_atoms",
        "hetero.models.dynamight.steps.deformations",
        "hetero.models.dynamight.steps.half_set_error",
        "hetero.models.dynamight.backprojection_step.deformed_backprojection",
    )

    def __init__(
        self, box_size: int, apix: float, template_size: int | None = None,
        loss: Mapping[str, Any] | None = None, schedule: DynaMightSchedule | None = None,
        zdim: int = 6, n_gaussians: int = 10000, consensus_map: str | None = None,
        particle_diameter: float | None = None, soft_edge: float = 20.0,
        encoder_hidden: list[int] | tuple[int, ...] = (256, 128), encoder_pool: int = 2,
        encoder_final_activation: str = "relu", encoder_phase_flip: bool = False,
        encoder_lowpass: float | None = None, encoder_logstd_init: float | None = None,
        n_frequencies: int = 10,
        decoder_layers: int = 8, decoder_width: int = 32, decoder_out_init_std: float = 0.0,
        decoder_hidden_init: str = "reference",
        initial_threshold: float | None = None, initial_quantile: float = 0.99,
        initial_sampling: str = "random",
        initial_width_px: float | None = None, min_width_px: float = 0.75, max_width_px: float = 4.0,
        shared_width: bool = False,
        fit_steps: int = 50, fit_lr: float = 1e-4, init_max_particles: int = 20000,
        init_wiener_snr: float = 1.0, init_seed: int = 0,
        encoder_lr: float | None = None, decoder_lr: float | None = None,
        consensus_lr: float | None = None, warmup_lr: float | None = None,
        warmup_updates_positions: bool = True, update_decay: float = 0.95,
        update_floor: float = 0.1, pooled_particles: int = 100, calibration_fraction: float = 0.1,
        target_mask: bool = False, pose_refinement: bool = False,
        pose_lr: float = 1e-3, decode_half: int = 1, splat_sigma_px: float | None = 0.75,
        boundary_batch_size: int = 64, optimizer: Callable | None = None,
        scheduler: Callable | None = None, render_method: str = "fourier", **data_info,
    ) -> None:
        super().__init__(box_size, apix, template_size, optimizer, None, render_method, **data_info)
        if scheduler is not None:
            raise ValueError("model=dynamight sets its learning rates per phase; pass scheduler=null")
        if initial_sampling not in ("random", "stratified"):
            raise ConfigError(f"model.initial_sampling must be random or stratified, got {initial_sampling!r}")
        if decode_half not in (1, 2):
            raise ValueError(f"model.decode_half must be 1 or 2, got {decode_half}")
        hparams = {k: _plain(v) for k, v in locals().items()
                   if k not in ("self", "loss", "schedule", "optimizer", "scheduler", "data_info", "__class__")}
        hparams.update({k: v for k, v in data_info.items() if isinstance(v, int | float | bool | str)})
        self.save_hyperparameters(hparams)
        self.automatic_optimization = False
        self.latent_dim = int(zdim)
        self.n_particles = int(data_info.get("n_particles") or 0)
        d = self.box_size
        extent = d * self.apix
        self.particle_diameter = float(particle_diameter or extent - soft_edge)
        vae = dict(
            encoder=dict(hidden=_plain(encoder_hidden), pool=int(encoder_pool),
                         final_activation=encoder_final_activation, logstd_init=encoder_logstd_init),
            decoder=dict(n_frequencies=n_frequencies, n_layers=decoder_layers, width=decoder_width,
                         out_init_std=float(decoder_out_init_std), hidden_init=str(decoder_hidden_init)),
            consensus=dict(initial_width_px=initial_width_px, min_width_px=min_width_px,
                           max_width_px=max_width_px, shared_width=shared_width),
            splat_sigma_px=splat_sigma_px,
        )
        self.halves = torch.nn.ModuleList([HalfSetVAE(d, self.apix, zdim, n_gaussians, **vae) for _ in range(2)])
        terms = dict((loss or {}).items())
        self.regularizer = terms.get("geometric") or GeometricRegularization()
        # a negative weight would reward what it penalises; the floor divides
        self.regularization_factor = checked_number(terms.get("regularization_factor", 0.9), "loss.regularization_factor")
        self.regularization_floor = checked_number(terms.get("regularization_floor", 5e-4), "loss.regularization_floor",
                                                   positive=True)
        norm = terms.get("regularization_norm", "per_batch")
        if norm not in ("per_batch", "accumulated"):
            shown = "null" if norm is None else repr(norm)
            raise ConfigError(f"loss.regularization_norm must be per_batch or accumulated, got "
                              f"{shown}")
        self.regularization_norm = str(norm)
        self.kl_beta = kl_weight(checked_number(terms.get("kld_factor", 0.01), "loss.kld_factor"), d)
        self.kld_warmup_epochs = checked_number(terms.get("kld_warmup_epochs", 0), "loss.kld_warmup_epochs",
                                                integer=True, unit="of epochs")
        self.noise_whitening = bool(terms.get("noise_whitening", True))
        self.schedule = schedule or DynaMightSchedule()
        self.cfg = dict(
            consensus_map=consensus_map, initial_threshold=initial_threshold,
            initial_quantile=float(initial_quantile), initial_sampling=str(initial_sampling),
            fit_steps=int(fit_steps), fit_lr=float(fit_lr),
            init_max_particles=int(init_max_particles), init_wiener_snr=float(init_wiener_snr),
            init_seed=int(init_seed), update_decay=float(update_decay), update_floor=float(update_floor),
            calibration_fraction=float(calibration_fraction), pose_lr=float(pose_lr),
            boundary_batch_size=int(boundary_batch_size),
        )
        self.lrs = dict(encoder=encoder_lr, decoder=decoder_lr, consensus=consensus_lr, warmup=warmup_lr)
        self.warmup_updates_positions = bool(warmup_updates_positions)
        self.target_mask = bool(target_mask)
        self.encoder_phase_flip = bool(encoder_phase_flip)
        if encoder_lowpass is not None and not 2 * self.apix <= float(encoder_lowpass) <= d * self.apix / 2:
            raise ValueError(f"model.encoder_lowpass ({encoder_lowpass} Å) must lie between Nyquist "
                             f"(2 x {self.apix:.3g} Å) and half the box ({d * self.apix / 2:.4g} Å), or be null")
        self.encoder_lowpass = None if encoder_lowpass is None else float(encoder_lowpass)
        self.decode_half = int(decode_half) - 1
        self.pose_refinement = bool(pose_refinement)
        mask = circular_mask(d, self.particle_diameter / (2 * self.apix), soft_edge / self.apix)
        self.register_buffer("mask", mask, persistent=False)
        ky, kx = torch.fft.fftfreq(d)[:, None], torch.fft.rfftfreq(d)[None, :]
        keep = (ky**2 + kx**2).sqrt() <= (self.apix / self.encoder_lowpass if self.encoder_lowpass else 1.0)
        self.register_buffer("encoder_band", keep.float(), persistent=False)
        E.register_state(self, d, int(zdim), int(pooled_particles))
        if self.pose_refinement:
            if self.n_particles <= 0:
                raise ValueError("model.pose_refinement needs n_particles (from the data module)")
            # Per-particle corrections (axis-angle rotation in radians, shift in pixels), stepped
            # once per epoch on the gradients accumulated over it (reference PoseModule).
            self.pose_rotation = torch.nn.Parameter(torch.zeros(self.n_particles, 3))
            self.pose_shift = torch.nn.Parameter(torch.zeros(self.n_particles, 2))
            self.register_buffer("pose_grad", torch.zeros(self.n_particles, 5))
        self.graphs: list = [None, None]
        self.register_buffer("validation_mask", torch.zeros(max(self.n_particles, 0), dtype=torch.bool))

    # ------------------------------------------------------------------ interface
    def prepare(self, batch: dict[str, Tensor]) -> PreparedBatch:
        """Recentred target spectra, masked encoder input, CTF (float32, no autocast)."""
        with torch.autocast(self.device.type, enabled=False):
            d = self.box_size
            img = batch["image"].float()
            spec = torch.fft.rfft2(torch.fft.ifftshift(img, dim=(-2, -1)))
            spec = spec * phase_ramp_rfft(batch["origin_px"].float(), d)
            ctf = None
            if has_ctf(batch["ctf"]):
                ctf = ctf_table_compute(batch["ctf"].float(), d, batch["apix"].float())
            enc_spec = spec
            if self.encoder_phase_flip and ctf is not None:
                enc_spec = spec * torch.sign(centered_to_rfft(ctf))
            if self.encoder_lowpass is not None:
                enc_spec = enc_spec * self.encoder_band
            centred = torch.fft.fftshift(torch.fft.irfft2(enc_spec, s=(d, d)), dim=(-2, -1))
            enc = centred * self.mask
            if self.target_mask:
                masked = torch.fft.fftshift(torch.fft.irfft2(spec, s=(d, d)), dim=(-2, -1)) * self.mask
                spec = torch.fft.rfft2(torch.fft.ifftshift(masked, dim=(-2, -1)))
            return PreparedBatch(spec, enc, ctf, batch["rotation"].float(), batch["index"], batch["half"])

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Tensor], batch_idx: int = 0) -> dict[str, Tensor]:
        prep = self.prepare(batch)
        mus, logstds = zip(*(h.encode(prep.encoder_input) for h in self.halves))
        second = prep.half == 1
        own_mu = torch.where(second[:, None], mus[1], mus[0])
        own_logstd = torch.where(second[:, None], logstds[1], logstds[0])
        mapped = torch.cat([mus[1], torch.ones_like(mus[1][:, :1])], 1) @ self.latent_map
        common = torch.where(second[:, None], mapped, mus[0])
        rmsd = torch.zeros_like(own_mu[:, 0])
        largest = torch.zeros_like(rmsd)
        for h, vae in enumerate(self.halves):
            sel = prep.half == h
            if sel.any():
                delta = vae.displacements(own_mu[sel]) * vae.consensus.extent_angstrom
                norm = delta.norm(dim=-1)
                rmsd[sel] = norm.pow(2).mean(-1).sqrt()
                largest[sel] = norm.amax(-1)
        index = batch["index"]
        validation = (self.validation_mask[index] if len(self.validation_mask)
                      else torch.zeros_like(index, dtype=torch.bool))
        return {"index": index, "z_mu": common, "z_logstd": own_logstd,
                "z_mu_half1": mus[0], "z_mu_half2": mus[1], "half": prep.half,
                "validation": validation, "deformation_rmsd": rmsd, "deformation_max": largest}

    def encode(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """All of :meth:`predict_step`'s per-particle outputs (``z_mu``: common latent space)."""
        out = self.predict_step(batch)
        return {k: v for k, v in out.items() if k != "index"}

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """``(K, zdim)`` latents of half set ``model.decode_half`` (the common space) ->
        ``(K, T, T, T)`` maps of the deformed Gaussians on the template grid (float32), in the
        template voxel units of :class:`~hetero.models.homogeneous.HomogeneousModel`."""
        return self.decode_half_set(z, self.decode_half)

    @torch.no_grad()
    def decode_half_set(self, z: Tensor, half: int) -> Tensor:
        """:meth:`decode` with half set ``half`` (0-based)'s decoder and consensus."""
        vae = self.halves[half]
        positions, _ = vae.deformed(z.to(self.device, torch.float32))
        vols = vae.consensus.rasterize(self.template_size, positions)
        return vols * (self.box_size / self.template_size)

    @torch.no_grad()
    def deformed_angstrom(self, z: Tensor, half: int) -> Tensor:
        """``(K, N, 3)`` deformed Gaussian centres (Å from the box centre) of half ``half``."""
        vae = self.halves[half]
        positions, _ = vae.deformed(torch.as_tensor(z, dtype=torch.float32, device=self.device))
        return vae.consensus.positions_angstrom(positions)

    @torch.no_grad()
    def displacement_field(self, z: Tensor, coords_angstrom: Tensor, half: int) -> Tensor:
        """Half ``half``'s displacement field ``(K, M, 3)`` (Å) at any ``(M, 3)`` points (Å)."""
        vae = self.halves[half]
        extent = vae.consensus.extent_angstrom
        coords = torch.as_tensor(coords_angstrom, dtype=torch.float32, device=self.device) / extent
        z = torch.as_tensor(z, dtype=torch.float32, device=self.device)
        return vae.displacements(z, coords) * extent

    # ------------------------------------------------------------------ training
    def configure_optimizers(self):
        params = []
        for group in GROUPS:
            for h, vae in enumerate(self.halves):
                params.append({"params": list(getattr(vae, group).parameters()), "name": f"{group}{h}"})
        if self.pose_refinement:
            params.append({"params": [self.pose_rotation, self.pose_shift], "name": "pose",
                           "lr": self.cfg["pose_lr"]})
        factory = self._optimizer_factory or (lambda p, **kw: torch.optim.Adam(p, lr=1e-4))
        return factory(params)

    def base_lr(self) -> float:
        keywords = getattr(self._optimizer_factory, "keywords", None) or {}
        return float(keywords.get("lr", 1e-4))

    def on_fit_start(self) -> None:
        precision = str(getattr(self.trainer, "precision", "32-true"))
        if precision.startswith("16"):
            raise ValueError("model=dynamight supports trainer.precision=32-true or bf16-mixed, not fp16")
        dm = getattr(self.trainer, "datamodule", None)
        val = getattr(dm, "val_indices", None)
        if val is not None and len(self.validation_mask) > int(np.max(val, initial=-1)):
            self.validation_mask.zero_()
            self.validation_mask[torch.as_tensor(val, dtype=torch.long, device=self.device)] = True
        if not bool(self.initialized):
            initialize_consensus(self)
        E.rebuild_graphs(self)

    @property
    def kl_weight(self) -> float:
        """beta of this epoch: constant (``kld_warmup_epochs=0``, the notes' reference HEAD) or
        ``beta * min(1, (epoch - n_warmup_epochs) / kld_warmup_epochs)``, a linear ramp from 0
        over the first deformation epochs (other reference versions: ``min(epoch, 100) / 100``)."""
        if self.kld_warmup_epochs == 0:
            return self.kl_beta
        done = int(self.current_epoch) - self.schedule.n_warmup_epochs
        return self.kl_beta * min(1.0, max(0.0, done / self.kld_warmup_epochs))

    def on_train_epoch_start(self) -> None:
        E.epoch_boundary(self, int(self.current_epoch))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        epoch = int(self.current_epoch)
        phase = self.schedule.phase(epoch, frozen=bool(self.frozen_epoch >= 0))
        prep = self.prepare(batch)
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        rotations, shifts = E.refined_poses(self, prep)
        counts = torch.stack([(prep.half == h).sum() for h in (0, 1)]).float()
        total = prep.target.real.new_zeros(())
        logs: dict[str, Tensor] = {}
        for h, vae in enumerate(self.halves):
            sel = prep.half == h
            if not sel.any():
                continue
            reg = float(self.reg_weight[h]) if phase == "main" else 0.0
            out = vae.losses(prep.select(sel), phase != "warmup", self.whitening_weights(),
                             self.kl_weight, self.regularizer, self.graphs[h], reg,
                             rotations=rotations[sel], shifts_px=None if shifts is None else shifts[sel])
            total = total + out["total"] * counts[h]
            E.record_batch(self, h, out, int(sel.sum()))
            for key in ("data", "kl", "geometric"):
                logs[f"train/{key}_half{h + 1}"] = out[key].detach()
        total.backward()
        E.accumulate_pose_gradients(self)
        E.step_groups(self, opt, phase, counts)
        loss = total.detach() / counts.sum().clamp(min=1)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(prep))
        self.log_dict(logs, batch_size=len(prep))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if batch_idx + 1 == self.trainer.num_training_batches:
            E.sync_epoch_statistics(self)

    def on_train_epoch_end(self) -> None:
        for h in (0, 1):
            self.log(f"train/lambda_half{h + 1}", float(self.reg_weight[h]), sync_dist=True)
            self.log(f"train/update_rate_half{h + 1}", float(self.update_rate[h]), sync_dist=True)
        self.log("train/kl_beta", self.kl_weight, sync_dist=True)  # loss.kld_warmup_epochs
        if int(self.frozen_epoch) >= 0 and self.current_epoch + 1 >= self.schedule.stop_epoch(int(self.frozen_epoch)):
            log.info(f"DynaMight: consensus frozen since epoch {int(self.frozen_epoch)}; stopping")
            self.trainer.should_stop = True

    def whitening_weights(self) -> Tensor | None:
        return self.whitening if self.noise_whitening and bool(self.whitening_on) else None

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self.align_stats.zero_()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        prep = self.prepare(batch)
        errors, mus = [], []
        for vae in self.halves:
            out = vae.losses(prep, True, None, 0.0, sample=False)
            errors.append(out["data"])
            mus.append(out["mu"])
        A.accumulate_alignment(self, mus[1], mus[0])
        bs = len(prep)
        for h in (0, 1):
            self.log(f"val/loss_half{h + 1}", errors[h], on_epoch=True, sync_dist=True, batch_size=bs)
        self.log("val/loss", (errors[0] + errors[1]) / 2, prog_bar=True, on_epoch=True, sync_dist=True,
                 batch_size=bs)

    def on_validation_epoch_end(self) -> None:
        r2 = A.solve_alignment(self)
        if r2 is not None:
            self.log("val/latent_alignment_r2", r2, sync_dist=True)
