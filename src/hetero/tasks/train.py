"""The training task behind ``train.py``: data -> model -> Lightning fit -> latents.

Run directory (``paths.output_dir``) after a run::

    .hydra/                 Hydra's composed config and overrides (a resume reuses them)
    config_resolved.yaml    the fully resolved config (what analyze.py rebuilds from)
    data_info.json          geometry the model was built with (box, pixel size, counts)
    manifest.json           what analysis reads: method, result loader, parts (checkpoint,
                            latents), method analysis steps (hetero.utils.manifest)
    split.npz               train/validation split and half sets (reused on resume)
    dropped_particles.csv   particles left out by data.drop_nonfinite (when set)
    checkpoints/best.ckpt   best by the validation metric
    checkpoints/last.ckpt   end of the latest epoch (or the SIGTERM / every-N-steps save)
    logs/                   csv / tensorboard / wandb (a resume continues them)
    train.log               the log, including any error that stopped the run
    latents/<ckpt>-<sha>/   the inference pass of the kept checkpoint (named by its SHA-256):
                            z_mu.npy (N, Z) in input order, z_logstd.npy, model extras such as
                            the memory bank, source.json (which checkpoint made them)

Resume: ``python train.py hydra.run.dir=<run> ckpt_path=last`` (see :mod:`hetero.tasks.resume`).
A SIGTERM (what schedulers send) saves ``last.ckpt`` at the next batch boundary and ends the
process with status 143 (:class:`~hetero.utils.errors.Preempted`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hetero.utils.config import apply_extras, instantiate_dict
from hetero.utils.errors import ConfigError, Preempted
from hetero.utils.files import write_json, write_text
from hetero.utils.manifest import run_manifest, write_manifest
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``"last"``: ``<output_dir>/checkpoints/last.ckpt``; ``"auto"`` (a requeued SLURM job):
    the newest of that and Lightning's ``hpc_ckpt_*.ckpt``, ``None`` when neither exists; else a
    path that must exist.

    :raises ConfigError: the checkpoint does not exist (naming where it was looked for).
    """
    if not ckpt_path:
        return None
    last = output_dir / "checkpoints" / "last.ckpt"
    if ckpt_path == "auto":
        found = [p for p in [last, *output_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
        return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None
    path = last if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        hint = (" (ckpt_path=last resumes the run in hydra.run.dir: pass "
                "hydra.run.dir=<run dir> ckpt_path=last)") if ckpt_path == "last" else ""
        raise ConfigError(f"ckpt_path={ckpt_path}: no checkpoint at {path}{hint}")
    return str(path)


def _requeued() -> bool:
    """Whether this is a SLURM job that was requeued (preempted or timed out, then restarted)."""
    import os

    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def prepare_machine(cfg: DictConfig) -> dict:
    """:func:`check_machine`, then torch's threads from ``cfg.threads`` for the processes it
    counts (:func:`hetero.utils.threads.configure_threads`), logged; returns that function's
    record. Every task that trains calls it first."""
    from hetero.utils.threads import configure_threads

    threads = configure_threads(cfg.get("threads", "auto"), check_machine(cfg))
    log.info(f"torch threads per process: {threads['threads']} ({threads['how']})")
    return threads


def check_machine(cfg: DictConfig) -> int:
    """Refuse a GPU trainer on a machine without one; warn when CPU processes exceed cores.

    :return: training processes this node starts (for the thread count).
    :raises ConfigError: ``trainer.accelerator`` is ``gpu``/``cuda`` and torch finds no GPU.
    """
    import torch

    from hetero.utils.threads import usable_cpus

    accel = str(cfg.trainer.get("accelerator", "auto")).lower()
    devices = cfg.trainer.get("devices", 1)
    if accel in ("gpu", "cuda") and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ConfigError(
            f"trainer.accelerator={accel} needs a CUDA GPU, but torch ({torch.__version__}, {build}) "
            "finds none. On this machine use trainer=cpu (one process, all usable cores), or "
            "trainer=ddp_sim to try multi-process training on CPU; trainer=gpu and trainer=ddp "
            "are for CUDA machines."
        )
    on_cpu = accel == "cpu" or (accel == "auto" and not torch.cuda.is_available())
    try:
        n = len(devices) if isinstance(devices, list | tuple) or OmegaConf.is_list(devices) else int(devices)
    except (TypeError, ValueError):
        n = 1  # "auto": one process on CPU, all GPUs otherwise (counted by Lightning)
    if on_cpu:
        cpus, source = usable_cpus()
        if n > cpus:
            log.warning(
                f"trainer.devices={n} on CPU starts {n} training processes but this process may "
                f"use {cpus:g} CPUs ({source}): they compete for the cores and train slower than "
                "one process. Use trainer.devices=1 (it uses all cores) unless you are testing "
                "multi-process training."
            )
    return max(n, 1)


def _read_loop_state(ckpt_path: str | None) -> tuple[int, int | None] | None:
    """``(logger step, epochs done)`` a checkpoint resumes at: Lightning's
    ``_batches_that_stepped`` and the fit loop's processed epochs (``None`` if absent)."""
    if not ckpt_path:
        return None
    import torch

    try:  # mmap: only the loop state is read, not the weights
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip-format checkpoint
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    try:
        fit = ckpt["loops"]["fit_loop"]
        step = int(fit["epoch_loop.state_dict"].get("_batches_that_stepped", ckpt.get("global_step", 0)))
    except (KeyError, TypeError, AttributeError):
        return int(ckpt.get("global_step", 0)), None
    try:
        return step, int(fit["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return step, None


def _check_work_left(cfg: DictConfig, ckpt_path: str, epochs_done: int | None) -> None:
    """Refuse to resume a run that has already trained ``trainer.max_epochs`` epochs: Lightning
    would stop at once and the run's metrics and config would be overwritten with nothing new.

    :raises ConfigError: naming the epochs done and what to pass."""
    max_epochs = cfg.trainer.get("max_epochs")
    if epochs_done is None or max_epochs is None or int(max_epochs) < 0 or epochs_done < int(max_epochs):
        return
    raise ConfigError(
        f"{ckpt_path} has trained {epochs_done} epochs and trainer.max_epochs is {max_epochs}: nothing "
        f"is left to train, so the run was left as it is. To train on, pass "
        f"trainer.max_epochs={epochs_done + 10} (any number above {epochs_done}).")


def _loggers(cfg: DictConfig, resume_step: int | None) -> list:
    loggers = instantiate_dict(cfg.get("logger"), "logger")
    for logger in loggers:
        if hasattr(logger, "resume_step"):  # hetero.callbacks.loggers.ResumableCSVLogger
            logger.resume_step = resume_step
        kwargs = getattr(logger, "_kwargs", None)
        if resume_step is not None and type(logger).__name__ == "TensorBoardLogger" and isinstance(kwargs, dict):
            kwargs.setdefault("purge_step", resume_step)  # hide events logged after the checkpoint
    return loggers


def _callbacks(cfg: DictConfig) -> list:
    callbacks = instantiate_dict(cfg.get("callbacks"), "callbacks")
    if not cfg.trainer.get("enable_progress_bar", True):
        # `trainer.enable_progress_bar=false` wins over the progress-bar callback.
        from lightning.pytorch.callbacks import ProgressBar

        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit ``cfg.model`` on ``cfg.data``; returns (metrics, objects).

    :raises Preempted: the run got SIGTERM (``last.ckpt`` was saved first).
    :raises ConfigError: a GPU trainer without a GPU, a missing ``ckpt_path``.
    """
    import hydra
    import lightning as L

    apply_extras(cfg)
    output_dir = Path(cfg.paths.output_dir)
    threads = prepare_machine(cfg)
    ckpt_setting = cfg.get("ckpt_path")
    if not ckpt_setting and _requeued():
        ckpt_setting = "auto"  # a requeued SLURM job (submitit launcher) continues its run
    ckpt_path = resolve_ckpt_path(ckpt_setting, output_dir)
    loop_state = _read_loop_state(ckpt_path)
    if ckpt_path and not (ckpt_setting == "auto" and _requeued()):  # a requeued job still runs its post-fit steps
        _check_work_left(cfg, ckpt_path, loop_state[1])
    if ckpt_path:
        log.info(f"Resuming from {ckpt_path}")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    log.info(f"Instantiating data <{cfg.data._target_}>")
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    info = datamodule.info()
    log.info(
        f"{info['n_particles']} particles ({info['n_train']} train / {info['n_val']} val), "
        f"box {info['original_box']} -> {info['box_size']} px, {info['apix']:.3f} Å/px"
    )

    log.info(f"Instantiating model <{cfg.model._target_}>")
    model = hydra.utils.instantiate(cfg.model, **info)
    callbacks = _callbacks(cfg)
    loggers = _loggers(cfg, None if loop_state is None else loop_state[0])
    log.info(f"Instantiating trainer <{cfg.trainer._target_}>")
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    if trainer.is_global_zero:
        write_text(output_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        write_json(output_dir / "data_info.json", info)
        write_manifest(output_dir, run_manifest(model.manifest()))
    log.info(f"Config: {output_dir / 'config_resolved.yaml'} (print it with extras.print_config=true)")
    n_params = sum(p.numel() for p in model.parameters())
    for logger in trainer.loggers:
        logger.log_hyperparams(
            {**OmegaConf.to_container(cfg, resolve=True), "model/params": n_params}
        )

    start = time.perf_counter()
    _fit(trainer, model, datamodule, ckpt_path)
    fit_seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics["time/fit_seconds"] = fit_seconds
    metrics["time/threads"] = threads["threads"]

    best = _best_checkpoint(trainer)
    latents_folder = None
    if cfg.get("predict") and trainer.is_global_zero and not trainer.fast_dev_run:
        latents_folder = _write_latents(cfg, model, datamodule, best, output_dir)
    if trainer.is_global_zero and best:
        write_manifest(output_dir, run_manifest(model.manifest(), _relative(best, output_dir), latents_folder))
    if trainer.is_global_zero:
        write_json(output_dir / "train_metrics.json", metrics)
        log.info(f"Run directory: {output_dir}")
        if best:
            log.info(f"Next: python analyze.py run_dir={output_dir}")
        else:  # debug=fdr, or checkpointing switched off: nothing for analysis to load
            log.info("No checkpoint was kept (a fast_dev_run or callbacks without checkpoints), so this run "
                     "cannot be analysed")
    return metrics, {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}


def _fit(trainer, model, datamodule, ckpt_path: str | None) -> None:
    """``trainer.fit``; Lightning's SIGTERM stop (an exit with status 0) becomes :class:`Preempted`,
    and its exit after Ctrl-C (``sys.exit(1)`` once it has shut down gracefully) a
    :class:`KeyboardInterrupt` again, which the entry points end with status 130; a checkpoint
    whose weights do not fit the model a :class:`ConfigError` (not a traceback)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        raise Preempted(_sigterm_message(trainer)) from None
    except SystemExit as err:
        if err.code == 1 and getattr(trainer, "interrupted", False):
            raise KeyboardInterrupt from None
        raise
    except RuntimeError as err:
        if ckpt_path and "Error(s) in loading state_dict" in str(err):
            detail = " ".join(str(err).split("\n")[1:2]).strip()
            root = getattr(trainer, "default_root_dir", None)  # the run directory (paths.output_dir)
            own = root is not None and Path(ckpt_path).resolve().is_relative_to(Path(root).resolve())
            advice = ("it is this run's own checkpoint, so the model built from this configuration changed "
                      "since it was saved (an option set on this resume, or a newer hetero): drop that "
                      "option, use the hetero version that made the run, or train a new run"
                      if own else "a checkpoint continues the configuration it was trained with. Resume its "
                      "own run with `python train.py hydra.run.dir=<its run directory> ckpt_path=last`, or "
                      "start without ckpt_path")
            raise ConfigError(f"ckpt_path={ckpt_path} does not fit this model ({detail} ...): {advice}") from None
        raise


def _sigterm_message(trainer) -> str:
    """What a SIGTERM left behind: the checkpoint it saved, or the last one there is."""
    from hetero.callbacks.checkpoint import LastCheckpoint

    where = f"Stopped by SIGTERM at epoch {trainer.current_epoch}, step {trainer.global_step}; "
    last = next((cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)), None)
    if last is None:
        return where + "no checkpoint was saved (callbacks.last_checkpoint is off)"
    resume = f"Resume with: python train.py hydra.run.dir={last.path.parents[1]} ckpt_path=last"
    if last.last_reason == "SIGTERM":
        return where + f"saved {last.path}. " + resume
    if last.path.is_file():
        return where + f"{last.path} holds the last completed epoch (this model saves at epoch ends only). " + resume
    return where + "no epoch was completed, so there is no checkpoint to resume from"


def _write_latents(cfg: DictConfig, model, datamodule, best: str | None, output_dir: Path) -> str | None:
    """Encode every particle with the kept checkpoint into ``latents/<ckpt>-<sha>/``; returns
    that folder (relative to the run) or ``None`` when no checkpoint was saved."""
    import torch

    from hetero.tasks.inference import encode_particles, write_run_latents

    if not best:
        log.warning("predict=true but no checkpoint was saved: no latents written (analysis computes them)")
        return None
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    latents = encode_particles(model, datamodule.predict_dataloader(), _inference_device(cfg))
    folder = write_run_latents(output_dir, best, latents, datamodule.particles_path)
    log.info(f"Latents of {datamodule.info()['n_particles']} particles -> {output_dir / folder}")
    return folder


def _best_checkpoint(trainer) -> str | None:
    """``best.ckpt`` if one was written, else ``last.ckpt``, else ``None``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from hetero.callbacks.checkpoint import LastCheckpoint

    for cb in trainer.callbacks:
        path = getattr(cb, "best_model_path", "") if isinstance(cb, ModelCheckpoint) else ""
        if path and Path(path).is_file():
            return path
    for cb in trainer.callbacks:
        if isinstance(cb, LastCheckpoint) and cb.path.is_file():
            return str(cb.path)
    return None


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(Path(path).resolve())


def _inference_device(cfg: DictConfig):
    import torch

    accel = str(cfg.trainer.get("accelerator", "auto"))
    if accel in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def task_function(cfg: DictConfig):
    """The task ``train.py`` runs: ``cfg.task`` (a dotted path; default :func:`train`). A
    method that is not one LightningModule (AlphaCryo4D's stages) names its own task in its
    model config."""
    path = cfg.get("task")
    if not path:
        return train
    import hydra

    return hydra.utils.get_method(str(path))


def run(cfg: DictConfig) -> float | None:
    """Entry used by ``train.py``: run the task, always close wandb, return the optimised metric."""
    try:
        metrics, _ = task_function(cfg)(cfg)
    finally:
        _finish_wandb()
    name = cfg.get("optimized_metric")
    if name and name not in metrics:
        log.warning(f"optimized_metric {name} was not logged; available: {sorted(metrics)}")
        return None
    return metrics.get(name) if name else None


def _finish_wandb() -> None:
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
