"""The AlphaCryo4D task: every stage from particle shuffling to particle voting.

``python train.py model=alphacryo4d`` selects it (``task`` in the config); see
:mod:`hetero.tasks.alphacryo4d.pipeline`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)


def run_pipeline(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the AlphaCryo4D stages selected by ``cfg.alphacryo4d.stages`` in ``paths.output_dir``.

    :return: ``(metrics, objects)`` like :func:`hetero.tasks.train.train`.
    """
    import lightning as L

    from hetero.tasks.alphacryo4d import resampling, stages
    from hetero.tasks.alphacryo4d.pipeline import (
        PipelineContext,
        read_records,
        run_stages,
        write_run_files,
    )
    from hetero.tasks.train import prepare_machine
    from hetero.utils.config import apply_extras

    stages.check_landscape_options(cfg.alphacryo4d.landscape)  # before any stage runs
    apply_extras(cfg)
    prepare_machine(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    root = run_dir / "alphacryo4d"
    ctx = PipelineContext(cfg=cfg, run_dir=run_dir, root=root, records=read_records(root))
    write_run_files(ctx)
    functions = {
        "shuffling": stages.shuffling,
        "resampling": resampling.resampling,
        "autoencoder": stages.autoencoder,
        "manifold": stages.manifold,
        "landscape": stages.landscape,
        "path": stages.path,
        "voting": stages.voting,
    }
    summaries = run_stages(ctx, functions)
    metrics: dict[str, Any] = {}
    for name, summary in summaries.items():
        for key, value in (summary or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics[f"{name}/{key}"] = float(value)
    for name, record in ctx.records.items():
        metrics[f"time/{name}_seconds"] = float(record.get("seconds", 0.0))
    if ctx.is_global_zero:
        from hetero.utils.files import write_json

        write_json(run_dir / "train_metrics.json", metrics)
        log.info(f"Run directory: {run_dir}")
        log.info(f"Next: python analyze.py run_dir={run_dir}")
    return metrics, {"cfg": cfg, "context": ctx, "summaries": summaries}
