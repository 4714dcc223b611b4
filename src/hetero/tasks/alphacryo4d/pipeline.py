"""AlphaCryo4D end to end: ``python train.py model=alphacryo4d data=...``.

The stages run in order as one task; each writes its outputs under
``<run_dir>/alphacryo4d/<stage>/`` and a record in ``<run_dir>/alphacryo4d/pipeline.json``
(fingerprint of its settings and of every stage before it, wall time, summary). A stage whose
fingerprint matches its record and whose outputs exist is skipped, so a run resumes where it
stopped (``hydra.run.dir=<run dir>``), and changing, e.g., ``alphacryo4d.path.k`` recomputes the
path and the voting but not the volumes.

=============== =============================================================================
``shuffling``   M-fold particle unions (:mod:`hetero.models.alphacryo4d.shuffling`)
``resampling``  ``class3d`` on every union in one data pass -> volumes + memberships
``autoencoder`` the 3D residual autoencoder trained on the volumes -> features
``manifold``    t-SNE (or UMAP) of z-scored volumes + standardised features
``landscape``   pseudo-energy landscape of the volume counts, its minima
``path``        minimum-energy path (string method) and the state centres along it
``voting``      volumes clustered around the states, particle voting, RELION subsets
=============== =============================================================================

``alphacryo4d.stages`` (``all`` or a list) selects what to run; stages before them must be up to
date (else the error names the stage to run). ``alphacryo4d.force`` recomputes stages even when
their records match. The run manifest (analysis contract) names the AlphaCryo4D result loader, so
``python analyze.py run_dir=<run dir>`` reconstructs every state with half maps and FSC.

Under DDP every rank runs this function: the Lightning stages (resampling, autoencoder) train
on all ranks, everything else runs on rank 0 while the others wait at a barrier.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hetero.utils.files import write_json, write_text
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)

STAGES = ("shuffling", "resampling", "autoencoder", "manifold", "landscape", "path", "voting")
#: data settings that do not change any result (excluded from the fingerprints)
_RUNTIME_DATA_KEYS = ("num_workers", "pin_memory", "persistent_workers", "batch_size", "val_batch_size",
                      "split_file", "dropped_file", "datadir")  # paths in the run dir: a moved run stays current
RECORDS = "pipeline.json"


class StageOutOfDateError(RuntimeError):
    """A stage needed by the selected ones has no valid output."""


@dataclass
class PipelineContext:
    """What every stage function receives.

    :param cfg: the full training config (``cfg.alphacryo4d`` holds the stage settings, ``cfg.model`` the autoencoder).
    :param run_dir: the Hydra run directory; ``root`` = ``run_dir / "alphacryo4d"``.
    :param records: ``pipeline.json`` content, one entry per finished stage.
    """

    cfg: DictConfig
    run_dir: Path
    root: Path
    records: dict = field(default_factory=dict)
    _datamodules: dict = field(default_factory=dict)

    @property
    def mcfg(self) -> DictConfig:
        """The stage settings (``cfg.alphacryo4d``)."""
        return self.cfg.alphacryo4d

    @property
    def is_global_zero(self) -> bool:
        from lightning.pytorch.utilities import rank_zero_only

        return (getattr(rank_zero_only, "rank", 0) or 0) == 0

    def stage_dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def datamodule(self, sampler: str | None = None):
        """The consensus particles (every particle predicted and classified: no validation
        split), set up once per ``sampler`` (``None``: ``data.sampler``; the class3d stage asks
        for ``"sequential"``: every particle once per EM iteration)."""
        key = sampler or "default"
        if key not in self._datamodules:
            import hydra

            extra = {"sampler": sampler} if sampler else {}
            dm = hydra.utils.instantiate(
                self.cfg.data, val_fraction=0.0, split_file=str(self.root / "split.npz"), **extra
            )
            dm.prepare_data()
            dm.setup("fit")
            info = dm.info()
            if not info.get("has_poses", True):
                from hetero.models.alphacryo4d.module import missing_poses_error

                raise missing_poses_error(info.get("particles_file") or getattr(dm, "particles_path", None))
            self._datamodules[key] = dm
        return self._datamodules[key]

    def trainer(self, stage: str, max_epochs: int, monitor: str | None = "val/loss", **overrides):
        """A Lightning trainer from ``cfg.trainer`` for a stage: the configured callbacks, with
        the run-level checkpoints (``callbacks.model_checkpoint`` / ``last_checkpoint``) moved
        to ``<stage>/checkpoints/`` (best by ``monitor``; none when ``monitor`` is ``None``),
        and its logs under the stage folder."""
        import hydra
        from lightning.pytorch.callbacks import ProgressBar

        folder = self.stage_dir(stage)
        callbacks = []
        for name, node in (self.cfg.get("callbacks") or {}).items():
            if node is None:
                continue
            extra = {}
            if name in ("model_checkpoint", "last_checkpoint"):
                if name == "model_checkpoint" and monitor is None:
                    continue
                extra = {"dirpath": str(folder / "checkpoints")}
                if name == "model_checkpoint":
                    extra.update(monitor=monitor, mode="min", filename="best")
            callbacks.append(hydra.utils.instantiate(node, **extra))
        if not self.cfg.trainer.get("enable_progress_bar", True):
            callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        loggers = []
        for node in (self.cfg.get("logger") or {}).values():
            if node is None:
                continue
            extra = {"save_dir": str(folder / "logs")} if "save_dir" in node else {}
            loggers.append(hydra.utils.instantiate(node, **extra))
        return hydra.utils.instantiate(
            self.cfg.trainer, max_epochs=int(max_epochs), default_root_dir=str(folder),
            callbacks=callbacks, logger=loggers or False, **overrides,
        )


def best_checkpoint(trainer) -> str:
    """Path of the best checkpoint of a stage trainer's ``ModelCheckpoint`` ('' if none)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    found = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    return found[0].best_model_path if found else ""


def _container(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def data_fingerprint(cfg: DictConfig) -> str:
    """Hash of the data settings that determine the particles (not where caches live or how
    they are loaded)."""

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in _RUNTIME_DATA_KEYS and k != "cache_dir"}
        return node

    return _hash({"data": strip(_container(cfg.data))})


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_fingerprint(cfg: DictConfig, name: str, upstream: str) -> str:
    """Hash of the stage's settings and of the fingerprint of the stage before it."""
    section = _container(cfg.alphacryo4d.get(name)) if name in cfg.alphacryo4d else None
    extra = {}
    if name in ("resampling", "autoencoder"):  # numerics of the Lightning stages
        extra = {"precision": str(cfg.trainer.get("precision")), "seed": cfg.get("seed")}
    if name == "autoencoder":
        extra["model"] = _container(cfg.model)
    return _hash({"stage": name, "settings": section, "extra": extra, "upstream": upstream})


def _selected(cfg: DictConfig) -> tuple[list[str], set[str]]:
    stages = cfg.alphacryo4d.get("stages", "all")
    names = list(STAGES) if stages in (None, "all") else [str(s) for s in stages]
    force = cfg.alphacryo4d.get("force") or []
    force = set(STAGES) if force == "all" else {str(s) for s in force}
    unknown = [s for s in [*names, *force] if s not in STAGES]
    if unknown:
        raise ValueError(f"alphacryo4d.stages / alphacryo4d.force: unknown stage(s) {unknown}; stages: "
                         f"{', '.join(STAGES)}")
    return names, force


def _outputs_exist(ctx: PipelineContext, record: dict) -> bool:
    return all((ctx.run_dir / p).exists() for p in record.get("outputs", []))


def run_stages(ctx: PipelineContext, functions: dict[str, Callable]) -> dict[str, Any]:
    """Run the selected stages in order, skipping those whose records match.

    :param functions: ``stage name -> fn(ctx) -> (summary dict, output paths)``.
    :raises StageOutOfDateError: a stage before a selected one is missing or stale and not
        selected itself.
    """
    selected, force = _selected(ctx.cfg)
    last = max(STAGES.index(s) for s in selected)
    upstream = data_fingerprint(ctx.cfg)
    summaries: dict[str, Any] = {}
    for name in STAGES[: last + 1]:
        fp = stage_fingerprint(ctx.cfg, name, upstream)
        upstream = fp
        record = ctx.records.get(name)
        current = record is not None and record.get("fingerprint") == fp and _outputs_exist(ctx, record)
        if current and name not in force:
            log.info(f"[{name}] up to date ({record.get('seconds', 0):.1f} s when run); skipped")
            summaries[name] = record.get("summary", {})
            continue
        if name not in selected:
            why = "has not run" if record is None else "is out of date (settings or inputs changed)"
            raise StageOutOfDateError(
                f"AlphaCryo4D stage '{name}' {why}, and the selected stages {selected} need it: "
                f"add it to alphacryo4d.stages (or run alphacryo4d.stages=all)"
            )
        log.info(f"[{name}] running")
        start = time.perf_counter()
        summary, outputs = functions[name](ctx)
        seconds = time.perf_counter() - start
        if ctx.is_global_zero:
            ctx.records[name] = {
                "fingerprint": fp, "seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                "summary": summary, "outputs": [str(Path(p).relative_to(ctx.run_dir)) for p in outputs],
            }
            # a rerun invalidates every later record
            for later in STAGES[STAGES.index(name) + 1 :]:
                if later in ctx.records:
                    ctx.records[later]["fingerprint"] = None
            write_json(ctx.root / RECORDS, ctx.records)
        summaries[name] = summary
        log.info(f"[{name}] done in {seconds:.1f} s")
        if not ctx.is_global_zero and name == "autoencoder":
            break  # the remaining stages run on rank 0 only
    return summaries


def read_records(root: Path) -> dict:
    path = root / RECORDS
    return json.loads(path.read_text()) if path.is_file() else {}


def write_run_files(ctx: PipelineContext) -> None:
    """``config_resolved.yaml``, ``data_info.json`` (the particles' geometry, what analysis
    reads with ``RunDir``) and the run manifest (rank 0)."""
    from hetero.models.alphacryo4d.result import run_manifest_dict
    from hetero.utils.manifest import write_manifest

    if not ctx.is_global_zero:
        return
    write_text(ctx.run_dir / "config_resolved.yaml", OmegaConf.to_yaml(ctx.cfg, resolve=True))
    info = {k: v for k, v in ctx.datamodule().info().items() if isinstance(v, int | float | bool | str)}
    write_json(ctx.run_dir / "data_info.json", info)
    write_manifest(ctx.run_dir, run_manifest_dict())
