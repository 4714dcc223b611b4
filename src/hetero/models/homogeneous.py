"""``model=homogeneous``: one voxel volume fitted to all images (the zero-latent baseline).

The volume lives on the template grid (``T``-cube spanning the training box) and is rendered
with the same renderer and CTF as every other model. It starts from a Wiener-filtered
backprojection of a subset of the training images (optional) and is refined by gradient
descent on the per-pixel squared error. Its decoded map is the consensus that heterogeneous
models are compared with.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hetero.models.base import HeteroModel
from hetero.physics.fourier import fourier_crop_3d
from hetero.physics.reconstruction import BackprojectionAccumulator


class HomogeneousModel(HeteroModel):
    """A single ``(T, T, T)`` volume.

    :param loss: dict of loss terms; uses ``loss["reconstruction"](predicted, target)``.
    :param init_backprojection: initialise from a backprojection of training images.
    :param init_max_particles: number of training images used for that initialisation.
    :param l2_weight: ridge penalty ``l2_weight * mean(V^2)``.
    """

    latent_dim = 0
    method = "homogeneous"

    def __init__(
        self,
        box_size: int,
        apix: float,
        template_size: int | None = None,
        loss: dict | None = None,
        init_backprojection: bool = True,
        init_max_particles: int = 2000,
        l2_weight: float = 0.0,
        optimizer=None,
        scheduler=None,
        render_method: str = "fourier",
        **data_info,
    ) -> None:
        super().__init__(
            box_size, apix, template_size, optimizer, scheduler, render_method, **data_info
        )
        self.save_hyperparameters(ignore=["loss", "optimizer", "scheduler"])
        t = self.template_size
        self.volume = nn.Parameter(torch.zeros(t, t, t))
        self.register_buffer("initialized", torch.tensor(False))
        self.loss_terms = nn.ModuleDict(dict(loss or {}))
        if "reconstruction" not in self.loss_terms:
            from hetero.losses.mse import ImageMSELoss

            self.loss_terms["reconstruction"] = ImageMSELoss()
        self.init_backprojection = init_backprojection
        self.init_max_particles = int(init_max_particles)
        self.l2_weight = float(l2_weight)

    # ------------------------------------------------------------------ interface
    def encode(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        z = batch["image"].new_zeros(batch["image"].shape[0], 0, dtype=torch.float32)
        return {"z_mu": z, "z_logstd": z}

    def decode(self, z: Tensor) -> Tensor:
        return self.volume.detach()[None].expand(z.shape[0], -1, -1, -1)

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        if self.init_backprojection and not bool(self.initialized):
            self._initialize_from_backprojection()
        self.initialized.fill_(True)

    @torch.no_grad()
    def _initialize_from_backprojection(self) -> None:
        """Wiener backprojection of up to ``init_max_particles`` training images. Under DDP each
        rank inserts its own shard (``init_max_particles / world_size`` images) and the sums are
        all-reduced, so every rank starts from the same map."""
        loader = self.trainer.datamodule.train_dataloader() if self.trainer.datamodule else None
        if loader is None:
            return
        acc = BackprojectionAccumulator(self.box_size, pad_factor=2, device=self.device)
        world = int(getattr(self.trainer, "world_size", 1) or 1)
        limit = -(-self.init_max_particles // world)
        seen = 0
        for batch in loader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            ctf = None
            if torch.any(batch["ctf"][:, 3] > 0):
                from hetero.physics.ctf import ctf_table_compute

                ctf = ctf_table_compute(batch["ctf"].float(), acc.ctf_size, batch["apix"].float())
            acc.add(self.targets(batch), batch["rotation"].float(), None, ctf)
            seen += batch["image"].shape[0]
            if seen >= limit:
                break
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(acc.weight)
            torch.distributed.all_reduce(torch.view_as_real(acc.numerator))
            total = torch.tensor([seen], dtype=torch.float64, device=acc.weight.device)
            torch.distributed.all_reduce(total)
            seen = int(total.item())
        if seen == 0:
            return
        volume = acc.reconstruct(wiener_snr=1.0).float()
        if self.template_size != self.box_size:
            volume = fourier_crop_3d(volume, self.template_size)
        # Line integrals: template voxel values scale with (D/T) relative to render-box voxels.
        self.volume.copy_(volume * (self.box_size / self.template_size))

    def _step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        target = self.targets(batch)
        predicted = self.render(self.volume, batch["rotation"], batch)
        losses = {"reconstruction": self.loss_terms["reconstruction"](predicted, target)}
        if self.l2_weight > 0:
            losses["l2"] = self.l2_weight * torch.mean(self.volume.float() ** 2)
        losses["total"] = sum(losses.values())
        return losses

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        losses = self._step(batch)
        bs = batch["image"].shape[0]
        self.log("train/loss", losses["total"], prog_bar=True, batch_size=bs)
        for name, value in losses.items():
            if name != "total":
                self.log(f"train/loss/{name}", value, batch_size=bs)
        return losses["total"]

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        losses = self._step(batch)
        self.log(
            "val/loss", losses["reconstruction"], prog_bar=True, on_epoch=True, sync_dist=True,
            batch_size=batch["image"].shape[0],
        )
