"""What every analysis step receives: :class:`AnalysisContext`.

A step is a function ``step(ctx) -> None`` (``hetero.analysis.steps``, or a method's own
steps named in its run manifest). It reads ``ctx.cfg``, ``ctx.result`` and earlier steps'
``ctx.state``, writes files under ``ctx.out`` (recording them in ``ctx.files``), adds numbers
to ``ctx.metrics`` (-> ``metrics.json``) and report blocks to ``ctx.section(name)``. A method's
step with a result the user should see at once adds ``label -> text`` to
``ctx.metrics["headline"]``: the summary (console and report) shows it.

Example usage::

    ctx = AnalysisContext(cfg=cfg, run=run, out=Path("analysis"), result=result)
    embedding(ctx); clustering(ctx)
    ctx.state["clusters"].labels          # (N,) from k-means
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetero.analysis.result import AnalysisResult

_UNSET = object()


class _NoProgress:
    """Stands in for :class:`rich.progress.Progress` when progress bars are off."""

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def advance(self, *args, **kwargs) -> None:
        pass

    def update(self, *args, **kwargs) -> None:
        pass


@dataclass
class AnalysisContext:
    """State shared by the steps of one analysis.

    :param cfg: the analyze config. :param run: the :class:`~hetero.analysis.rundir.RunDir`.
    :param out: output folder. :param result: the run's :class:`AnalysisResult`.
    :param metrics: numbers for ``metrics.json``. :param files: files written (for the report).
    :param state: results of earlier steps (``"pca"``, ``"embedding_2d"``, ``"clusters"``, ...).
    :param sections: report blocks per section title.
    :param progress: a :class:`rich.progress.Progress` (or a silent stand-in).
    """

    cfg: Any
    run: Any
    out: Path
    result: AnalysisResult | None = None
    metrics: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    state: dict = field(default_factory=dict)
    sections: dict[str, list[str]] = field(default_factory=dict)
    progress: Any = field(default_factory=_NoProgress)
    _truth: Any = field(default=_UNSET, repr=False)

    # -- report and files ----------------------------------------------------------------------
    def section(self, name: str) -> list[str]:
        """The list of report blocks of section ``name`` (created empty)."""
        return self.sections.setdefault(name, [])

    @property
    def fig_dir(self) -> Path:
        return self.out / "figures"

    # -- geometry ------------------------------------------------------------------------------
    @property
    def box(self) -> int:
        """Original box (pixels): the grid of every written map."""
        return int(self.run.info["original_box"])

    @property
    def apix(self) -> float:
        """Original pixel size (Å)."""
        return float(self.run.info["original_apix"])

    # -- data and truth ------------------------------------------------------------------------
    def datamodule(self, purpose: str):
        """The run's data module (built on first use). :raises DataUnavailableError: loudly."""
        return self.run.datamodule(purpose)

    @property
    def truth(self) -> dict | None:
        """Ground truth (user files or the synthetic dataset's), loaded on first use; ``None``
        when there is none or ``ground_truth.enabled`` is false."""
        if self._truth is _UNSET:
            self._truth = self._load_truth()
        return self._truth

    @truth.setter
    def truth(self, value: dict | None) -> None:
        self._truth = value

    def _load_truth(self) -> dict | None:
        from hetero.analysis.truth import load_ground_truth

        gt_cfg = self.cfg.get("ground_truth") or {}
        if not gt_cfg.get("enabled", True):
            return None
        user = self.cfg.get("truth")
        dm = None if user else self.datamodule("ground truth (synthetic data)")
        truth_dir = getattr(dm, "truth_dir", None) if dm is not None else None
        dataset = None
        if truth_dir and self.cfg.get("oracle", True):
            from hetero.data.synthetic import SyntheticDataset

            particles = getattr(dm, "particles", None)
            dataset = particles if isinstance(particles, SyntheticDataset) else None
        return load_ground_truth(
            user, truth_dir, self.result.n_particles, self.box, self.apix, dataset
        )

    # -- maps ----------------------------------------------------------------------------------
    def decode_to_original(self, points: np.ndarray, description: str | None) -> torch.Tensor:
        """Decoded maps at ``points`` ``(K, E)`` resampled to the original box and pixel size."""
        from hetero.analysis.volumes import decode_volumes, resample_to_box

        if self.result.decode is None:
            raise ValueError(f"{self.result.method} cannot decode maps")
        bar = self.progress if description else None
        vols = decode_volumes(
            self.result.decode,
            points,
            int(self.cfg.maps.get("batch_size", 4)),
            bar,
            description or "",
        )
        return resample_to_box(vols, float(self.result.voxel_size), self.box, self.apix)

    def write_series(
        self, folder: str | Path, volumes: torch.Tensor, prefix: str, play: bool = False, first: int = 0
    ) -> list[Path]:
        """Maps ``<out>/<folder>/<prefix>_000.mrc ...`` (numbered from ``first``) plus a ChimeraX
        ``<name>.cxc``."""
        from hetero.analysis.volumes import contour_level, write_chimerax_script, write_maps

        folder = self.out / folder
        paths = write_maps(folder, volumes, self.apix, prefix, first)
        level = contour_level(volumes, float(self.cfg.maps.get("contour_fraction", 0.05)))
        script = write_chimerax_script(folder / f"{folder.name}.cxc", paths, level, play=play)
        self.files.extend([*paths, script])
        return paths
