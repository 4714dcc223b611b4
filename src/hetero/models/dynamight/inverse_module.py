"""``model=dynamight_inverse``: DynaMight's learned inverse deformations (paper "Improved 3D
reconstruction"; reference ``optimize-inverse-deformations``, notes section 6).

Trained from a finished forward run (``model.forward_run=<run dir>``; its checkpoint, config and
geometry are loaded, frozen): one inverse network per half set, the reference architecture
(positional encoding of the deformed coordinate, ``L = 6``, joined with ``z``; ``Linear(-> 96)``,
6 x ``[Linear 96 -> 96 + ELU]``, ``Linear(96 -> 3)``, ELU, zero-initialised ``Linear(3 -> 3)``; no
biases; ``c_hat = x' + residual``) -- the same layout as the forward
:class:`~hetero.models.dynamight.decoder.DeformationDecoder`, which is reused. Pairs are made
on the fly from each batch: the half set's own encoder gives ``z`` (its mean), its decoder the
deformed Gaussians ``x' = Gamma(c)``, and the network is trained to return ``c`` (the reference
caches them for all particles, ``N_particles x N_gaussians x 3`` floats; here nothing is kept).
Each half set's particles only reach its own networks. Optional off-centre noise
(``off_centre_noise_angstrom``, reference ``--add-noise`` ~5 Å) moves ``c`` before deforming it.

Loss: mean over particles and Gaussians of ``||c_hat - c||^2`` in Å^2 (the reference sums; with
Adam the scale does not change the steps). Optimiser: Adam, ``lr`` 5e-4, ``weight_decay`` 1e-4
(reference); the learning rate is halved after every epoch whose mean loss exceeds the mean of
the previous ``lr_halving_window`` (3) epochs (reference rule).

Validation logs the inverse-consistency errors in Å of the learned inverse and of the exact
iterative inverse (:mod:`.inverse`) on the validation particles: ``||Inv(Gamma(c)) - c||`` over
the consensus Gaussians and ``||Gamma(Inv(y)) - y||`` over a grid inside the consensus, and
their mutual difference. ``model.inverse`` (``iterative`` | ``learned``) chooses which inverse
:meth:`DynaMightInverse.inverse` returns (analysis).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from hetero.models.base import HeteroModel
from hetero.models.dynamight.decoder import DeformationDecoder
from hetero.models.dynamight.inverse import grid_points, half_set_field, iterative_inverse
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)


def load_forward_run(run_dir: str | Path, checkpoint: str = "best"):
    """The forward DynaMight model of a finished run (config + geometry + checkpoint, eval mode,
    CPU; ``torch.load(weights_only=True)``).

    :raises FileNotFoundError: naming the missing file and what to pass.
    """
    import hydra
    from omegaconf import OmegaConf

    from hetero.utils.manifest import read_manifest

    run = Path(run_dir)
    need = [run / "config_resolved.yaml", run / "data_info.json"]
    for path in need:
        if not path.is_file():
            raise FileNotFoundError(f"model.forward_run={run}: {path.name} is missing; pass the "
                                    "folder of a finished `train.py model=dynamight` run")
    if checkpoint == "best" and (run / "manifest.json").is_file():
        ckpt = run / read_manifest(run)["parts"]["model"]["path"]
    else:
        ckpt = Path(checkpoint) if Path(checkpoint).is_absolute() else run / "checkpoints" / f"{checkpoint}.ckpt"
    if not ckpt.is_file():
        ckpt = run / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"model.forward_run={run}: no checkpoint ({ckpt}); pass "
                                "model.forward_checkpoint=<file in checkpoints/>")
    cfg = OmegaConf.load(need[0])
    info = json.loads(need[1].read_text())
    model = hydra.utils.instantiate(cfg.model, **info)
    if not hasattr(model, "halves"):
        raise ValueError(f"model.forward_run={run} is a {cfg.model._target_} run, not model=dynamight")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    return model.eval()


class DynaMightInverse(HeteroModel):
    """Learned inverse deformations of a forward run (module docstring)."""

    method = "dynamight_inverse"
    embedding_key = "z_mu"
    analysis_steps = (
        "hetero.models.dynamight.steps.pseudo_atoms",
        "hetero.models.dynamight.steps.deformations",
        "hetero.models.dynamight.backprojection_step.deformed_backprojection",
    )

    def __init__(self, box_size: int, apix: float, forward_run: str, forward_checkpoint: str = "best",
                 inverse: str = "learned", n_frequencies: int = 6, n_layers: int = 6, width: int = 96,
                 lr: float = 5e-4, weight_decay: float = 1e-4, lr_halving_window: int = 3,
                 off_centre_noise_angstrom: float = 0.0, consistency_grid_step: int = 4,
                 consistency_iterations: int = 30, template_size: int | None = None,
                 optimizer=None, scheduler=None, **data_info) -> None:
        super().__init__(box_size, apix, template_size, None, None, **data_info)
        if inverse not in ("learned", "iterative"):
            raise ValueError(f"model.inverse must be learned or iterative, got {inverse!r}")
        self.save_hyperparameters({k: v for k, v in locals().items()
                                   if isinstance(v, int | float | str | bool) and k != "self"})
        self.forward_model = load_forward_run(forward_run, forward_checkpoint)
        self.forward_model.requires_grad_(False)
        if self.forward_model.box_size != self.box_size:
            raise ValueError(f"the forward run was trained at box {self.forward_model.box_size}, the data "
                             f"give {self.box_size}: pass the forward run's data settings (data.box_size)")
        zdim = self.forward_model.latent_dim
        self.latent_dim = zdim
        self.inverses = torch.nn.ModuleList(
            [DeformationDecoder(zdim, self.box_size, n_frequencies, n_layers, width) for _ in range(2)])
        self.inverse_kind = inverse
        self.forward_run = str(Path(forward_run).resolve())
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.window = int(lr_halving_window)
        self.noise = float(off_centre_noise_angstrom)
        self.grid_step, self.iterations = int(consistency_grid_step), int(consistency_iterations)
        self.epoch_losses: list[float] = []
        self._epoch_sum = torch.zeros(2)

    # ------------------------------------------------------------------ interface
    @property
    def halves(self):
        """The forward model's half sets (what DynaMight's analysis steps read)."""
        return self.forward_model.halves

    @property
    def decode_half(self) -> int:
        return self.forward_model.decode_half

    def manifest(self) -> dict:
        out = self.default_manifest()
        out["parts"]["forward_run"] = {"kind": "run", "path": self.forward_run}
        return out

    def train(self, mode: bool = True):
        super().train(mode)
        self.forward_model.eval()  # frozen: no dropout/BN changes, ever
        return self

    @torch.no_grad()
    def predict_step(self, batch, batch_idx: int = 0):
        return self.forward_model.predict_step(batch, batch_idx)

    def decode(self, z: Tensor) -> Tensor:
        return self.forward_model.decode(z)

    def deformed_angstrom(self, z: Tensor, half: int) -> Tensor:
        return self.forward_model.deformed_angstrom(z, half)

    def displacement_field(self, z, coords_angstrom, half: int) -> Tensor:
        return self.forward_model.displacement_field(z, coords_angstrom, half)

    def learned_inverse(self, z: Tensor, y: Tensor, half: int) -> Tensor:
        """Half ``half``'s learned ``Gamma^-1(y)`` ``(B, M, 3)`` Å for ``y`` ``(B, M, 3)`` Å."""
        extent = float(self.halves[half].consensus.extent_angstrom)
        coords = y.float() / extent
        return (coords + self.inverses[half](z.float(), coords).float()) * extent

    def inverse(self, z: Tensor, y: Tensor, half: int) -> Tensor:
        """``Gamma^-1(y)`` (Å) by ``model.inverse``: the learned network or the exact iteration."""
        if self.inverse_kind == "learned":
            return self.learned_inverse(z, y, half)
        return iterative_inverse(half_set_field(self.halves[half], z), y, self.iterations, 1e-3)[0]

    # ------------------------------------------------------------------ training
    def _pairs(self, batch, half: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(z, deformed x' (B, N, 3), target c (B, N, 3))`` in Å for the half's particles."""
        prep = self.forward_model.prepare(batch)
        sel = prep.half == half
        if not bool(sel.any()):
            return None
        vae = self.halves[half]
        with torch.no_grad():
            z, _ = vae.encode(prep.encoder_input[sel])
            rest = vae.consensus.positions_angstrom().detach().float().expand(len(z), -1, -1)
            if self.noise > 0:
                rest = rest + torch.randn_like(rest) * self.noise
            deformed = rest + half_set_field(vae, z)(rest)
        return z, deformed, rest

    def _half_loss(self, batch, half: int) -> Tensor | None:
        pairs = self._pairs(batch, half)
        if pairs is None:
            return None
        z, deformed, rest = pairs
        return (self.learned_inverse(z, deformed, half) - rest).pow(2).sum(-1).mean()

    def training_step(self, batch, batch_idx: int) -> Tensor:
        total = sum(p.sum() * 0.0 for p in self.inverses.parameters())  # every parameter in the graph (DDP)
        for h in (0, 1):
            loss = self._half_loss(batch, h)
            if loss is None:
                continue
            total = total + loss
            self._epoch_sum += torch.tensor([float(loss.detach()), 1.0])
            self.log(f"train/loss_half{h + 1}", loss.detach(), batch_size=len(batch["index"]))
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=len(batch["index"]))
        return total

    def on_train_epoch_start(self) -> None:
        self._epoch_sum = torch.zeros(2)

    def on_train_epoch_end(self) -> None:
        from hetero.models.dynamight.distributed import all_reduce_sum

        s = all_reduce_sum(self._epoch_sum.to(self.device, torch.float64)).cpu()
        loss = float(s[0] / s[1].clamp(min=1))
        previous = self.epoch_losses[-self.window:]
        if len(previous) == self.window and loss > sum(previous) / len(previous):
            opt = self.optimizers()
            opt = getattr(opt, "optimizer", opt)
            for group in opt.param_groups:
                group["lr"] *= 0.5
            log.info(f"epoch {self.current_epoch}: loss {loss:.4g} above the mean of the last "
                     f"{self.window} epochs: learning rate halved to {opt.param_groups[0]['lr']:.3g}")
        self.epoch_losses.append(loss)
        self.log("train/epoch_loss", loss, sync_dist=False)

    def configure_optimizers(self):
        return torch.optim.Adam(self.inverses.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    # The halving rule reads the previous epochs' losses: a resumed run must see the same ones (the
    # halved learning rate itself is in the optimiser's state).
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["inverse_epoch_losses"] = list(self.epoch_losses)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.epoch_losses = [float(v) for v in checkpoint.get("inverse_epoch_losses", [])]

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch, batch_idx: int) -> None:
        bs = len(batch["index"])
        losses = []
        for h in (0, 1):
            pairs = self._pairs(batch, h)
            if pairs is None:
                continue
            z, deformed, rest = pairs
            with torch.no_grad():
                errors = self.consistency(z, h, rest[:, :, :], deformed)
            for k, v in errors.items():
                self.log(f"val/{k}_half{h + 1}", v, on_epoch=True, sync_dist=True, batch_size=bs)
            with torch.no_grad():
                loss = (self.learned_inverse(z, deformed, h) - rest).pow(2).sum(-1).mean()
            losses.append(loss)
            self.log(f"val/loss_half{h + 1}", loss, on_epoch=True, sync_dist=True, batch_size=bs)
        if losses:
            self.log("val/loss", sum(losses) / len(losses), prog_bar=True, on_epoch=True, sync_dist=True,
                     batch_size=bs)

    @torch.no_grad()
    def consistency(self, z: Tensor, half: int, rest: Tensor | None = None, deformed: Tensor | None = None) -> dict:
        """Mean inverse-consistency errors (Å) of the learned and the iterative inverse for latents
        ``z``: ``consensus_*`` = ``||Inv(Gamma(c)) - c||``, ``grid_*`` = ``||Gamma(Inv(y)) - y||``
        over a grid inside the consensus, ``learned_vs_iterative`` = ``||Inv_l(y) - Inv_i(y)||`` on
        the grid and the deformed Gaussians."""
        vae = self.halves[half]
        field = half_set_field(vae, z)
        if rest is None:
            rest = vae.consensus.positions_angstrom().detach().float().expand(len(z), -1, -1)
            deformed = rest + field(rest)
        grid = grid_points(self.box_size, self.apix, self.grid_step, device=z.device)
        grid = grid[grid.norm(dim=-1) <= float(rest.norm(dim=-1).max())].expand(len(z), -1, -1)
        out = {}
        for kind in ("learned", "iterative"):
            if kind == "learned":
                inv = lambda y: self.learned_inverse(z, y, half)  # noqa: E731
            else:
                inv = lambda y: iterative_inverse(field, y, self.iterations, 1e-4)[0]  # noqa: E731
            out[f"consensus_{kind}"] = (inv(deformed) - rest).norm(dim=-1).mean()
            x = inv(grid)
            out[f"grid_{kind}"] = (x + field(x) - grid).norm(dim=-1).mean()
            out[f"_points_{kind}"] = torch.cat([inv(deformed), x], 1)
        out["learned_vs_iterative"] = (out.pop("_points_learned") - out.pop("_points_iterative")).norm(dim=-1).mean()
        return out
