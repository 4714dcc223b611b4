"""Reading a training run directory back: config, geometry, manifest, checkpoint, model, data.

Layout (written by :mod:`hetero.tasks.train`)::

    manifest.json  config_resolved.yaml  data_info.json  split.npz  checkpoints/{best,last}.ckpt
    latents/<checkpoint>-<sha256[:12]>/{z_mu.npy, ..., source.json}   logs/csv/metrics.csv

Analysis reads what the run offers from ``manifest.json`` (:mod:`hetero.utils.manifest`); a run
made before manifests existed gets one synthesised from its config's ``model._target_`` (the
model class's :meth:`~hetero.models.base.HeteroModel.default_manifest`), with a logged note.

Example usage::

    run = RunDir.open("logs/train/runs/2025-01-01_12-00-00", checkpoint="best")
    model = run.load_model()
    dm = run.datamodule("reconstruction")   # set up for prediction; loud if the data are missing
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetero.utils.manifest import read_manifest, run_manifest
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)

REQUIRED_INFO = ("original_box", "original_apix", "box_size", "apix")


class IncompleteRunDirError(FileNotFoundError):
    """The run directory is missing, or lacks a file the analysis needs."""


class DataUnavailableError(RuntimeError):
    """The run's particle data could not be set up for an analysis step that needs it."""


@dataclass
class RunDir:
    """A validated run directory.

    :param path: the run directory.
    :param checkpoint: the checkpoint file that will be loaded.
    :param cfg: the resolved training config (``DictConfig``).
    :param info: ``data_info.json`` (geometry the model was built with).
    :param manifest: ``manifest.json`` (or the one synthesised for an older run).
    """

    path: Path
    checkpoint: Path
    cfg: Any
    info: dict
    manifest: dict = field(default_factory=dict)
    _datamodule: Any = field(default=None, repr=False)

    @classmethod
    def open(cls, run_dir: str | Path, checkpoint: str = "best") -> RunDir:
        """Check ``run_dir`` and read its config, data info and manifest.

        :param checkpoint: ``best`` (the manifest's model checkpoint), ``last``, a file name in
            ``checkpoints/`` or a path. ``best`` falls back to ``last`` when only that exists.
        :raises IncompleteRunDirError: naming every missing piece.
        :raises hetero.utils.manifest.ManifestError: a malformed ``manifest.json``.
        """
        from omegaconf import OmegaConf

        path = Path(str(run_dir)).expanduser()
        if not path.is_dir():
            raise IncompleteRunDirError(f"run_dir {path} does not exist or is not a directory")
        manifest = read_manifest(path)
        missing = []
        config = path / "config_resolved.yaml"
        if not config.is_file():
            missing.append(f"{config.name} (the resolved training config)")
        info_file = path / "data_info.json"
        if not info_file.is_file():
            missing.append(f"{info_file.name} (the data geometry)")
        ckpt = _checkpoint_path(path, checkpoint, manifest)
        if ckpt is None:
            found = sorted(p.name for p in (path / "checkpoints").glob("*.ckpt"))
            missing.append(
                f"checkpoint '{checkpoint}' (looked in {path / 'checkpoints'}; found "
                f"{', '.join(found) if found else 'no .ckpt files'})"
            )
        if missing:
            raise IncompleteRunDirError(
                f"run_dir {path} is incomplete (was training interrupted before the first "
                "checkpoint?); missing: " + "; ".join(missing)
            )
        cfg = OmegaConf.load(config)
        info = json.loads(info_file.read_text())
        absent = [k for k in REQUIRED_INFO if k not in info]
        if absent:
            raise IncompleteRunDirError(f"{info_file} lacks {', '.join(absent)}")
        if "model" not in cfg or "data" not in cfg:
            raise IncompleteRunDirError(f"{config} has no 'model' and 'data' sections")
        if manifest is None:
            manifest = synthesise_manifest(cfg, path)
        return cls(path=path, checkpoint=ckpt, cfg=cfg, info=info, manifest=manifest)

    @property
    def metrics_csv(self) -> Path:
        """``logs/csv/metrics.csv`` (or the newest ``logs/**/metrics.csv`` of a versioned logger)."""
        default = self.path / "logs" / "csv" / "metrics.csv"
        if default.is_file():
            return default
        found = sorted((self.path / "logs").glob("**/metrics.csv"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else default

    def part_path(self, name: str) -> Path | None:
        """Path of manifest part ``name`` (relative paths are taken from the run dir)."""
        part = self.manifest.get("parts", {}).get(name)
        if part is None:
            return None
        p = Path(str(part["path"])).expanduser()
        return p if p.is_absolute() else self.path / p

    def override_data(self, overrides) -> None:
        """Merge ``overrides`` (non-null keys only, e.g. ``{"datadir": "/moved"}``) into the
        run's data config before the data module is built."""
        from omegaconf import OmegaConf

        if not overrides:
            return
        plain = (
            OmegaConf.to_container(overrides, resolve=True)
            if not isinstance(overrides, dict)
            else overrides
        )
        plain = {k: v for k, v in plain.items() if v is not None}
        if plain:
            self.cfg.data = OmegaConf.merge(self.cfg.data, plain)
            self._datamodule = None

    def load_model(self, device: str = "cpu"):
        """Rebuild the model from the config and load the checkpoint's weights (eval mode)."""
        import hydra
        import torch

        model = hydra.utils.instantiate(self.cfg.model, **self.info)
        try:
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        except Exception as err:
            raise RuntimeError(f"could not read checkpoint {self.checkpoint}: {err}") from err
        model.load_state_dict(state)
        return model.to(device).eval()

    def datamodule(self, purpose: str = "analysis"):
        """The run's data module, set up for prediction (all particles, input order); built once.

        :param purpose: what needs the data (named in the error message).
        :raises DataUnavailableError: naming what failed, and what to pass.
        """
        if self._datamodule is not None:
            return self._datamodule
        import hydra

        try:
            dm = hydra.utils.instantiate(self.cfg.data)
            dm.prepare_data()
            dm.setup("predict")
        except Exception as err:
            target = self.cfg.data.get("_target_", "?")
            raise DataUnavailableError(
                f"{purpose} needs the particle data of run {self.path}, but the data module "
                f"<{target}> could not be set up: {type(err).__name__}: {err}\n"
                "If the particle files moved, pass data.datadir=<folder holding the stacks> (or "
                "data.particles=<.star/.cs file>); to analyse without the particles, switch off "
                "every step that reads them: reconstruction.enabled=false subsets.enabled=false "
                "ground_truth.enabled=false (and keep latents computed for this checkpoint)."
            ) from err
        self._datamodule = dm
        return dm


def synthesise_manifest(cfg, run_dir: Path) -> dict:
    """The manifest of a run made before manifests existed, from ``cfg.model._target_``."""
    import hydra

    target = str(cfg.model.get("_target_", ""))
    try:
        cls = hydra.utils.get_class(target)
    except Exception as err:
        raise IncompleteRunDirError(
            f"{run_dir} has no manifest.json and its model class {target!r} cannot be imported: {err}"
        ) from err
    default = getattr(cls, "default_manifest", None)
    if callable(default):
        manifest = default()
    else:
        manifest = {
            "method": cls.__name__.lower(),
            "result_loader": "hetero.analysis.result.load_model_result",
            "parts": {},
            "analysis_steps": [],
        }
    log.info(
        f"{run_dir} has no manifest.json (made before manifests existed): using the default "
        f"manifest of {target}"
    )
    return run_manifest(manifest)


def _checkpoint_path(run_dir: Path, checkpoint: str, manifest: dict | None) -> Path | None:
    name = str(checkpoint)
    folder = run_dir / "checkpoints"
    candidates: list[Path] = []
    if name == "best" and manifest is not None:
        model = manifest.get("parts", {}).get("model")
        if model and model.get("kind") == "checkpoint":
            p = Path(str(model["path"])).expanduser()
            candidates.append(p if p.is_absolute() else run_dir / p)
    if name in ("best", "last"):
        candidates.append(folder / f"{name}.ckpt")
        if name == "best":
            candidates.append(folder / "last.ckpt")
    else:
        candidates += [Path(name).expanduser(), folder / name, folder / f"{name}.ckpt"]
    return next((p for p in candidates if p.is_file()), None)
