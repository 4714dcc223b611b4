"""Reading a training run directory back: config, geometry, checkpoint, latents, model.

Layout (written by :mod:`hetero.tasks.train`)::

    config_resolved.yaml  data_info.json  checkpoints/{best,last}.ckpt
    latents/z_mu.npy  latents/z_logstd.npy  logs/csv/metrics.csv

Example usage::

    run = RunDir.open("logs/train/runs/2025-01-01_12-00-00", checkpoint="best")
    model = run.load_model()
    z = run.latents()["z_mu"]          # None if the inference pass has not been run
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REQUIRED_INFO = ("original_box", "original_apix", "box_size", "apix")


class IncompleteRunDirError(FileNotFoundError):
    """The run directory is missing, or lacks a file the analysis needs."""


@dataclass
class RunDir:
    """A validated run directory.

    :param path: the run directory.
    :param checkpoint: the checkpoint file that will be loaded.
    :param cfg: the resolved training config (``DictConfig``).
    :param info: ``data_info.json`` (geometry the model was built with).
    """

    path: Path
    checkpoint: Path
    cfg: object
    info: dict

    @classmethod
    def open(cls, run_dir: str | Path, checkpoint: str = "best") -> RunDir:
        """Check ``run_dir`` and read its config and data info.

        :param checkpoint: ``best``, ``last``, a file name in ``checkpoints/`` or a path.
            ``best`` falls back to ``last`` when only that exists.
        :raises IncompleteRunDirError: naming every missing piece.
        """
        from omegaconf import OmegaConf

        path = Path(str(run_dir)).expanduser()
        if not path.is_dir():
            raise IncompleteRunDirError(f"run_dir {path} does not exist or is not a directory")
        missing = []
        config = path / "config_resolved.yaml"
        if not config.is_file():
            missing.append(f"{config.name} (the resolved training config)")
        info_file = path / "data_info.json"
        if not info_file.is_file():
            missing.append(f"{info_file.name} (the data geometry)")
        ckpt = _checkpoint_path(path, checkpoint)
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
        return cls(path=path, checkpoint=ckpt, cfg=cfg, info=info)

    @property
    def latents_dir(self) -> Path:
        return self.path / "latents"

    @property
    def metrics_csv(self) -> Path:
        """``logs/csv/metrics.csv`` (or the newest ``logs/**/metrics.csv`` of a versioned logger)."""
        default = self.path / "logs" / "csv" / "metrics.csv"
        if default.is_file():
            return default
        found = sorted((self.path / "logs").glob("**/metrics.csv"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else default

    def latents(self) -> dict[str, np.ndarray] | None:
        """``{"z_mu", "z_logstd"?}`` from ``latents/`` or ``None`` if ``z_mu.npy`` is absent."""
        z_mu = self.latents_dir / "z_mu.npy"
        if not z_mu.is_file():
            return None
        out = {"z_mu": np.load(z_mu)}
        logstd = self.latents_dir / "z_logstd.npy"
        if logstd.is_file():
            out["z_logstd"] = np.load(logstd)
        return out

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

    def datamodule(self):
        """The data module of the run, set up for prediction (all particles, input order)."""
        import hydra

        dm = hydra.utils.instantiate(self.cfg.data)
        dm.prepare_data()
        dm.setup("predict")
        return dm


def _checkpoint_path(run_dir: Path, checkpoint: str) -> Path | None:
    name = str(checkpoint)
    folder = run_dir / "checkpoints"
    candidates: list[Path] = []
    if name in ("best", "last"):
        candidates.append(folder / f"{name}.ckpt")
        if name == "best":
            candidates.append(folder / "last.ckpt")
    else:
        candidates += [Path(name).expanduser(), folder / name, folder / f"{name}.ckpt"]
    return next((p for p in candidates if p.is_file()), None)
