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

import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

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
    from hetero.utils.files import write_json

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
    out = _output_dir(cfg, run.path)
    with open_dict(cfg):
        cfg.output_dir = str(out)  # resolved (and per multirun job): what the steps and caches use
    with _replacing(out):
        metrics = _analyze(cfg, run, steps, out, start)
        write_json(out / ENTRIES_FILE, {"files": _written_files(out)})
    return metrics


#: top-level entries of an analysis folder made before analyses listed their files (a folder
#: holding anything else is refused as output_dir: its files would be replaced); an analysis
#: lists every file it wrote in ENTRIES_FILE, and a later one refuses any other file there
ANALYSIS_ENTRIES = frozenset({"analyze_config.yaml", "metrics.json", "report.html", "latent", "latents",
                              "clusters", "maps", "subsets", "figures", "landscape", "class3d", "dynamight"})
ENTRIES_FILE = ".analysis_entries.json"


def _written_files(out: Path) -> list[str]:
    """Every file under ``out`` (relative, ``/``-separated), the ``latents/`` cache excepted."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                  if p.is_file() and p.relative_to(out).parts[0] != "latents")


def _foreign_files(out: Path) -> list[str]:
    """Files in an earlier analysis folder that no analysis wrote: not in its ENTRIES_FILE
    (every file, at any depth), or, for a folder without a readable one (made before it
    existed), top-level entries outside ANALYSIS_ENTRIES."""
    import json

    try:
        listed = json.loads((out / ENTRIES_FILE).read_text())["files"]
    except (OSError, ValueError, TypeError, KeyError):
        return sorted({p.name for p in out.iterdir()} - ANALYSIS_ENTRIES - {ENTRIES_FILE})
    return sorted(set(_written_files(out)) - set(listed) - {ENTRIES_FILE})


def _output_dir(cfg: DictConfig, run_dir: Path) -> Path:
    """``cfg.output_dir``, checked: not the run directory or a folder above it, not a folder
    holding files that no analysis wrote (they would be deleted by the replacement); under a
    Hydra multirun every job writes ``<output_dir>_<job number>`` (default
    ``<run_dir>/analysis_<job number>``): jobs sharing one folder would replace each other's
    analysis.

    :raises ConfigError: naming ``output_dir=`` and the entries that are not an analysis's.
    """
    from hetero.tasks.cli import _multirun
    from hetero.utils.errors import ConfigError

    given = str(cfg.output_dir)
    run_dir = Path(os.path.realpath(run_dir))
    out = Path(os.path.realpath(Path(given).expanduser()))
    if out == run_dir or out in run_dir.parents or not out.name:
        raise ConfigError(f"output_dir={given} is the run directory or a folder above it; an analysis "
                          "replaces its output folder as a whole: give a folder of its own (default: "
                          "<run_dir>/analysis)")
    if _multirun():
        from hydra.core.hydra_config import HydraConfig

        out = out.with_name(f"{out.name}_{HydraConfig.get().job.num}")
        given = str(out)
        log.info(f"multirun: this job's analysis goes to {given}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={given} is a file; give a folder")
    if out.is_dir():
        foreign = _foreign_files(out)  # a run's manifest.json or checkpoints/ among them
        if foreign:
            shown = ", ".join(foreign[:6]) + (" ..." if len(foreign) > 6 else "")
            raise ConfigError(
                f"output_dir={given} holds files that no analysis wrote ({shown}); a re-analysis replaces "
                "its output folder as a whole and would delete them. Give an empty or new folder "
                "(default: <run_dir>/analysis); files of your own in an earlier analysis: move them out first")
    return out


@contextmanager
def _replacing(out: Path):
    """The earlier analysis in ``out`` moved aside while this one is written, deleted when it
    completes, put back if it fails or is stopped (an exception, Ctrl-C, SIGTERM); the
    ``latents/`` cache stays throughout
    (:class:`~hetero.utils.folder_replacement.FolderReplacement`)."""
    from hetero.utils.errors import ConfigError
    from hetero.utils.folder_replacement import FolderBusyError, FolderReplacement

    replacement = FolderReplacement(out, keep=("latents",))
    try:
        if replacement.begin():
            log.warning(f"{out}: an earlier analysis into it was interrupted; the one before it was put back first")
    except FolderBusyError as err:
        raise ConfigError(f"output_dir={out}: {err}; wait for it or give another output_dir") from None
    except OSError as err:
        raise ConfigError(f"output_dir={out}: cannot move the earlier analysis aside ({err}); give a "
                          "folder whose parent is writable") from None
    previous_handler = _raise_on_sigterm()
    try:
        yield
        replacement.commit()
    except BaseException:
        earlier = replacement.had_contents()
        replacement.rollback()
        log.error(f"The analysis did not finish: {out} "
                  + ("holds the earlier analysis, unchanged" if earlier else "holds no analysis")
                  + " (the latents/ cache is kept)")
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _raise_on_sigterm():
    """SIGTERM (a scheduler stopping the job) raises :class:`~hetero.utils.errors.Preempted`,
    so the earlier analysis is put back; returns the handler it replaced (``None`` outside the
    main thread, where signals cannot be handled)."""
    import threading

    from hetero.utils.errors import Preempted

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Preempted("analysis stopped by SIGTERM; the earlier analysis (if any) was put back")

    return signal.signal(signal.SIGTERM, handler)


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
