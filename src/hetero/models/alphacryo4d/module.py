"""Stage 3 of AlphaCryo4D as a LightningModule: train the residual autoencoder on volumes,
then take each volume's feature map from the trained encoder in eval mode.

Loss (paper eq. 2): ``mean((x - y)^2) + lambda * sum(theta^2)`` over convolution kernels and
biases (Keras ``l2`` regularisers; the reference's default lambda is 0, its tutorial's 1e-3).
Optimiser Adam with Keras' defaults (lr 1e-3, eps 1e-7; the paper says lr 0.01);
learning rate x0.1 when the monitored loss has not improved by 1e-4 for 3 epochs (Keras
``ReduceLROnPlateau(monitor='loss')``, i.e. the training loss; ``lr_monitor="val/loss"``
watches the held-out loss instead). Checkpoints keep the best ``val/loss``.

The reference extracted features with a freshly built network whose weights failed to load
(silently random). Here :func:`extract_features` takes the module it is given, puts it in
eval mode (BatchNorm running statistics) and runs its encoder.

Example usage::

    model = VolumeAutoencoder(channels=(2, 1), first_stride=1)
    trainer.fit(model, datamodule=VolumeDataModule("volumes.npy"))
    features = extract_features(model, dm.predict_dataloader())      # (V, F)
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hetero.models.alphacryo4d.autoencoder import ResidualAutoencoder3d


class VolumeAutoencoder(L.LightningModule):
    """The AlphaCryo4D autoencoder (:class:`ResidualAutoencoder3d`) with its training loop.

    :param channels: ``(c1, c2)`` block widths (reference ``(2, 1)``).
    :param first_stride: conv1 stride (reference code 1; paper Table 1: 2).
    :param l2_regularization: ``lambda`` of eq. 2.
    :param optimizer: partial optimiser (default Adam, lr 1e-3, eps 1e-7).
    :param scheduler: partial LR scheduler taking the optimiser (default
        ``ReduceLROnPlateau(factor=0.1, patience=3, threshold=1e-4, threshold_mode="abs")``);
        ``False`` for none.
    :param lr_monitor: metric the plateau scheduler watches (``train/loss`` or ``val/loss``).
    :param data_info: the data module's geometry (``box_size``, ``n_volumes``, ...), accepted
        like every model's and kept for the record.
    """

    #: no per-particle latent (AlphaCryo4D's features are per volume)
    latent_dim = 0
    #: AlphaCryo4D resamples its volumes at the consensus poses: particle data without poses
    #: is refused (the pipeline checks the particles before stage 1; so does this network
    #: when it is given the particles' data info)
    requires_poses = True

    def __init__(
        self,
        channels: tuple[int, int] = (2, 1),
        first_stride: int = 1,
        l2_regularization: float = 0.0,
        optimizer: Callable | None = None,
        scheduler: Callable | bool | None = None,
        lr_monitor: str = "train/loss",
        **data_info,
    ) -> None:
        super().__init__()
        if data_info.get("has_poses") is False:
            raise missing_poses_error(data_info.get("particles_file"))
        # plain types only, so that checkpoints load with weights_only=True (Hydra passes
        # ListConfig objects)
        self.save_hyperparameters({
            "channels": [int(c) for c in channels], "first_stride": int(first_stride),
            "l2_regularization": float(l2_regularization), "lr_monitor": str(lr_monitor),
        })
        self.data_info = {k: v for k, v in data_info.items() if isinstance(v, int | float | bool | str)}
        self.net = ResidualAutoencoder3d(tuple(channels), int(first_stride))
        self.l2_regularization = float(l2_regularization)
        self._optimizer_factory = optimizer
        self._scheduler_factory = scheduler
        self.lr_monitor = str(lr_monitor)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _mse(self, batch: dict[str, Tensor]) -> Tensor:
        x = batch["volume"]
        return F.mse_loss(self.net(x).float(), x.float())

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        mse = self._mse(batch)
        loss = mse
        if self.l2_regularization > 0:
            loss = loss + self.l2_regularization * self.net.kernel_l2()
        bs = batch["volume"].shape[0]
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("train/mse", mse, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        bs = batch["volume"].shape[0]
        self.log("val/loss", self._mse(batch), on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=True)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int = 0) -> dict[str, Tensor]:
        return {"index": batch["index"], "features": self.features(batch["volume"])}

    def features(self, x: Tensor) -> Tensor:
        """Flattened feature maps ``(B, F)`` float32 of volumes ``(B, 1, D, D, D)``."""
        return self.net.encode(x).flatten(1).float()

    def configure_optimizers(self):
        if self._optimizer_factory is None:
            optimizer = torch.optim.Adam(self.parameters(), lr=1e-3, eps=1e-7)
        else:
            optimizer = self._optimizer_factory(self.parameters())
        if self._scheduler_factory is False:
            return optimizer
        if not self._scheduler_factory:
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=0.1, patience=3, threshold=1e-4, threshold_mode="abs"
            )
        else:
            scheduler = self._scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": self.lr_monitor, "interval": "epoch"},
        }


def missing_poses_error(particles_file: str | None):
    """The :class:`~hetero.data.io.errors.InputError` for particles without consensus poses."""
    from hetero.data.io.errors import InputError

    return InputError(
        f"{particles_file or 'the particle input'}: no poses (orientations) found, but AlphaCryo4D "
        "reconstructs its resampled volumes at the consensus poses; give a consensus refinement with "
        "angles (rlnAngleRot/Tilt/Psi, alignments3D/pose) or data.poses=<cryoDRGN pose pickle>"
    )


@torch.no_grad()
def extract_features(
    model: VolumeAutoencoder, dataloader, device: torch.device | str | None = None, n_volumes: int | None = None
) -> np.ndarray:
    """Feature map of every volume from ``model``'s encoder in eval mode.

    :param n_volumes: rows of the output (default: largest ``batch["index"]`` + 1).
    :return: ``(V, F)`` float32, row ``i`` = the volume with ``batch["index"] == i`` (rows the
        loader does not cover are NaN).
    :raises ValueError: the loader yields a volume twice.
    """
    device = torch.device(device or "cpu")
    was_training = model.training
    model = model.to(device).eval()
    rows, feats = [], []
    for batch in dataloader:
        rows.append(batch["index"].numpy())
        feats.append(model.features(batch["volume"].to(device)).cpu().numpy())
    model.train(was_training)
    index = np.concatenate(rows)
    if len(np.unique(index)) != len(index):
        raise ValueError("extract_features: the loader yielded a volume twice")
    n = int(index.max()) + 1 if n_volumes is None else int(n_volumes)
    out = np.full((n, feats[0].shape[1]), np.nan, dtype=np.float32)
    out[index] = np.concatenate(feats)
    return out
