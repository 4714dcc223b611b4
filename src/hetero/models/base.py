"""The interface every ``hetero`` model implements, and what it shares.

Training tasks build a model as ``instantiate(cfg.model, **datamodule.info())``, so every model
takes the geometry of the data as keyword arguments (``box_size``, ``apix``, ``n_particles``,
...). Analysis relies only on this interface (``docs/design/analysis_interface.md``):

- ``latent_dim``: size of the per-particle latent (0 for the homogeneous model);
- ``encode(batch) -> {"z_mu": (B, Z), "z_logstd": (B, Z)}``;
- ``decode(z: (K, Z)) -> (K, T, T, T)`` volumes on the template grid, which covers the same
  physical extent as the training box (voxel size :meth:`template_voxel_size`); a model that
  cannot decode sets ``can_decode = False``;
- ``predict_step(batch)`` returns ``{"index": (B,), <name>: (B, ...), ...}``; the inference pass
  stores every key but ``index`` as ``<name>.npy`` in input order;
- class attributes ``method`` (short name), ``embedding_key`` / ``embedding_name`` (which
  predicted array is the per-particle embedding analysis clusters), ``labels_key`` /
  ``label_name`` (the method's own per-particle assignment, if any), ``label_first`` (the number
  label 0 carries in file names and reports: 1 for classes numbered as RELION numbers them);
- :meth:`state_maps` (maps the method made for its states, or ``None``) and :meth:`manifest`
  (what the training task writes into ``<run_dir>/manifest.json``).

Optimiser and scheduler arrive as Hydra partials (``_partial_: true``) and are not stored in
the checkpoint's hyper-parameters, so checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor

from hetero.data.io.errors import InputError
from hetero.models.components.renderer import Renderer, has_ctf, recenter_images


class HeteroModel(L.LightningModule):
    """Base LightningModule: geometry, renderer, optimiser wiring, the analysis interface.

    :param box_size: training image box ``D`` (pixels).
    :param apix: pixel size of the training box (Å).
    :param template_size: side ``T`` of the decoded volume (default ``D``).
    :param optimizer: partial ``torch.optim`` constructor taking the parameters.
    :param scheduler: partial LR scheduler constructor taking the optimiser, or ``None``.
    :param render_method: ``"fourier"`` (Fourier-slice, default) or ``"real"`` projection in the
        :class:`Renderer` (config key ``model.render_method``).
    """

    latent_dim: int = 0
    #: short method name recorded in the run manifest (default: the class name, lower case)
    method: str | None = None
    #: key of :meth:`predict_step`'s output that analysis embeds and clusters
    embedding_key: str = "z_mu"
    #: what the embedding is called in reports and file names
    embedding_name: str = "z"
    #: key of :meth:`predict_step`'s output holding the method's own (N,) int labels, if any
    labels_key: str | None = None
    #: what those labels are called in reports (e.g. "class")
    label_name: str | None = None
    #: the number label 0 carries in file names and reports (1: RELION's class numbering)
    label_first: int = 0
    #: whether :meth:`decode` maps embeddings to volumes
    can_decode: bool = True
    #: dotted paths of method-specific analysis steps, run after the shared ones
    analysis_steps: tuple[str, ...] = ()
    #: the model renders at the consensus poses: data without poses is refused
    requires_poses: bool = True

    def __init__(
        self,
        box_size: int,
        apix: float,
        template_size: int | None = None,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        render_method: str = "fourier",
        **data_info,
    ) -> None:
        super().__init__()
        if self.requires_poses and data_info.get("has_poses") is False:
            raise InputError(
                f"{data_info.get('particles_file') or 'the particle input'}: no poses "
                f"(orientations) found, but {type(self).__name__} renders every image at its "
                "consensus pose; give a consensus refinement with angles (rlnAngleRot/Tilt/Psi, "
                "alignments3D/pose) or data.poses=<cryoDRGN pose pickle>"
            )
        self.box_size = int(box_size)
        self.apix = float(apix)
        self.template_size = int(template_size or box_size)
        self.data_info = {k: v for k, v in data_info.items() if isinstance(v, int | float | bool | str)}
        self._optimizer_factory = optimizer
        self._scheduler_factory = scheduler
        self.renderer = Renderer(self.box_size, self.template_size, render_method)

    # ------------------------------------------------------------------ interface
    def encode(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def template_voxel_size(self) -> float:
        """Voxel size of decoded volumes (Å): the template spans the training box."""
        return self.apix * self.box_size / self.template_size

    def state_maps(self) -> Tensor | None:
        """``(S, T, T, T)`` maps the method itself made for its states (e.g. class maps, voxel
        size :meth:`template_voxel_size`), or ``None`` (default)."""
        return None

    @classmethod
    def default_manifest(cls) -> dict:
        """The run-manifest fields that follow from the class alone (see :meth:`manifest`)."""
        return {
            "method": cls.method or cls.__name__.lower(),
            "result_loader": "hetero.analysis.result.load_model_result",
            "parts": {
                "model": {
                    "kind": "checkpoint", "path": "checkpoints/best.ckpt",
                    "config": "config_resolved.yaml",
                },
            },
            "analysis_steps": list(cls.analysis_steps),
        }

    def manifest(self) -> dict:
        """The method's part of ``<run_dir>/manifest.json``: ``method``, ``result_loader`` (dotted
        path of ``loader(run, cfg) -> AnalysisResult``), ``parts`` (trained pieces, paths
        relative to the run dir) and ``analysis_steps`` (dotted paths). The training task fills
        in the checkpoint actually kept and the latents folder. Override to add parts."""
        return self.default_manifest()

    # ------------------------------------------------------------------ helpers
    def targets(self, batch: dict[str, Tensor]) -> Tensor:
        """Particle images recentred by their consensus origin, float32 ``(B, D, D)``."""
        return recenter_images(batch["image"].float(), batch["origin_px"].float())

    def render(self, volumes: Tensor, rotations: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Centred model images of ``volumes`` at ``rotations`` with the batch's CTF."""
        ctf = batch["ctf"] if has_ctf(batch["ctf"]) else None
        return self.renderer(volumes, rotations, ctf, batch["apix"])

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int = 0) -> dict[str, Tensor]:
        out = self.encode(batch)
        return {"index": batch["index"], "z_mu": out["z_mu"].float(), "z_logstd": out["z_logstd"].float()}

    def configure_optimizers(self):
        factory = self._optimizer_factory or (lambda p: torch.optim.Adam(p, lr=1e-3))
        optimizer = factory(self.parameters())
        if self._scheduler_factory is None:
            return optimizer
        scheduler = self._scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
