"""The analysis task behind ``analyze.py``: a trained run -> maps, subsets, figures, report.

It only composes: open the run -> load its :class:`~hetero.analysis.result.AnalysisResult`
through the loader its manifest names -> run the configured shared steps
(:mod:`hetero.analysis.steps`) -> run the manifest's method steps -> report. Every step is a
function of an :class:`~hetero.analysis.context.AnalysisContext` (see
``docs/design/analysis_interface.md``).

Output folder (``cfg.output_dir``, default ``<run_dir>/analysis``)::

    report.html  metrics.json  analyze_config.yaml
    latent/                      pca_coords.npy, pca_components.npz, umap.npy
    latents/<ckpt>-<sha>/        inference-pass arrays, when this analysis had to compute them
    clusters/                    labels.npy (N,), center_indices.npy (K,), counts.csv
    maps/decoded/                clusters/, pcN/, truth_states/ (or consensus/): decoded maps + .cxc
    maps/reconstructed/          clusters/, consensus/, truth_states/, method_<label>/: full and
                                 half maps from the particles, FSC curves, resolution.csv, .cxc
    subsets/                     cluster_000.star / .npy / .txt ...
    figures/                     the PNGs of the report

A re-analysis into the same folder replaces the earlier analysis as a whole: the earlier files
wait in ``.analysis.previous/`` beside it until the new analysis has finished and are put back
if it fails, so the folder never mixes two analyses (the ``latents/`` cache stays throughout).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
    )


def analyze(cfg: DictConfig) -> dict[str, Any]:
    """Run the analysis of ``cfg.run_dir``; returns the metrics dict (also in metrics.json).

    A re-analysis into the same ``output_dir`` replaces the earlier one as a whole: if it fails
    (or is interrupted), the earlier files are put back (module docstring).
    """
    from hetero.analysis.rundir import RunDir
    from hetero.analysis.steps import resolve_step, unclaimed_options

    start = time.perf_counter()
    if OmegaConf.is_missing(cfg, "run_dir"):
        raise ValueError("run_dir is required: python analyze.py run_dir=<training run directory>")
    run = RunDir.open(cfg.run_dir, cfg.get("checkpoint", "best"))
    run.override_data(cfg.get("data"))
    steps = [resolve_step(s) for s in cfg.steps] + [
        resolve_step(s) for s in run.manifest["analysis_steps"]
    ]
    unused = unclaimed_options(cfg, steps)
    if unused:
        from hetero.utils.errors import ConfigError

        raise ConfigError(
            f"{', '.join(k + '.enabled=true' for k in unused)}: no analysis step of this run "
            f"({run.path}, method {run.manifest['method']}, steps from its manifest.json: "
            f"{run.manifest['analysis_steps'] or 'none'}) reads that block, so it does not apply "
            "to this run: leave it off (conf/analyze.yaml says which method's step reads it). A "
            "run of that method trained before the step existed: add the step to steps=[...] "
            "(its dotted path)."
        )
    from hetero.analysis.steps.clustering import check_options

    check_options(cfg)  # before anything is written over an earlier analysis
    out = Path(str(cfg.output_dir))
    replacement = _replacement(out)
    if replacement.begin():
        log.warning(f"{out}: an earlier analysis was interrupted; the one before it was restored first")
    try:
        metrics = _analyze(cfg, run, steps, out, start)
    except BaseException:
        earlier = replacement.had_contents()
        replacement.rollback()
        log.error(f"The analysis did not finish: {out} "
                  + ("holds the earlier analysis, unchanged" if earlier else "holds no analysis")
                  + " (the latents/ cache is kept)")
        raise
    replacement.commit()
    return metrics


#: what an analysis folder holds at its top level (an output_dir with anything else is refused)
_ANALYSIS_ENTRIES = ("analyze_config.yaml", "metrics.json", "report.html", "latents")


def _replacement(out: Path):
    """The output folder's replacement: a re-analysis replaces the earlier one as a whole
    (restored if it fails; the ``latents/`` cache stays). A non-empty folder that is not an
    analysis is refused: its files would be moved aside and deleted."""
    from hetero.utils.errors import ConfigError
    from hetero.utils.files import FolderReplacement

    replacement = FolderReplacement(out, keep=("latents",))
    if out.is_dir() and not replacement.previous.is_dir():
        names = {p.name for p in out.iterdir()}
        if names and not names & set(_ANALYSIS_ENTRIES):
            raise ConfigError(
                f"output_dir={out} holds files that are not an analysis ({', '.join(sorted(names)[:5])}"
                f"{' ...' if len(names) > 5 else ''}); a re-analysis replaces its folder as a whole. "
                "Give an empty or new folder (default: <run_dir>/analysis)."
            )
    return replacement


def _analyze(cfg: DictConfig, run, steps: list, out: Path, start: float) -> dict[str, Any]:
    from hetero.analysis.context import AnalysisContext
    from hetero.analysis.result import load_result, validate_result
    from hetero.analysis.steps import resolve_step
    from hetero.utils.files import write_text

    write_text(out / "analyze_config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    log.info(
        f"Analysing {run.path} ({run.manifest['method']}, checkpoint {run.checkpoint.name}) -> {out}"
    )

    ctx = AnalysisContext(cfg=cfg, run=run, out=out)
    ctx.state["start_time"] = start
    ctx.result = load_result(run, cfg)
    validate_result(ctx.result)
    ctx.metrics.update(
        run_dir=str(run.path),
        checkpoint=str(run.checkpoint),
        method=ctx.result.method,
        n_particles=ctx.result.n_particles,
        latent_dim=ctx.result.embedding_dim,
        original_box=ctx.box,
        original_apix=ctx.apix,
        provenance=ctx.result.provenance,
    )
    if ctx.result.voxel_size:
        ctx.metrics.update(
            template_voxel_size=ctx.result.voxel_size,
            template_size=int(round(ctx.box * ctx.apix / ctx.result.voxel_size)),
        )
    with _progress(bool(cfg.progress)) as progress:
        ctx.progress = progress
        for step in steps:
            step(ctx)
    resolve_step("report")(ctx)
    return ctx.metrics
