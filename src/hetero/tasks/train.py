"""The training task behind ``train.py``: data -> model -> Lightning fit -> latents.

Run directory (``paths.output_dir``) after a run::

    .hydra/                 Hydra's composed config and overrides
    config_resolved.yaml    the fully resolved config (what analyze.py rebuilds from)
    data_info.json          geometry the model was built with (box, pixel size, counts)
    split.npz               train/validation split and half sets (reused on resume)
    checkpoints/best.ckpt   best by the validation metric; checkpoints/last.ckpt for resuming
    logs/                   csv / tensorboard / wandb
    latents/z_mu.npy        (N, Z) per-particle latent means in input order (+ z_logstd.npy,
                            model extras such as the memory bank)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hetero.utils.config import apply_extras, instantiate_dict
from hetero.utils.files import write_json, write_text
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``"last"`` means ``<output_dir>/checkpoints/last.ckpt``; paths must exist."""
    if not ckpt_path:
        return None
    path = output_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no checkpoint at {path}")
    return str(path)


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit ``cfg.model`` on ``cfg.data``; returns (metrics, objects)."""
    import hydra
    import lightning as L
    import torch

    apply_extras(cfg)
    output_dir = Path(cfg.paths.output_dir)
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
    callbacks = instantiate_dict(cfg.get("callbacks"), "callbacks")
    if not cfg.trainer.get("enable_progress_bar", True):
        # `trainer.enable_progress_bar=false` wins over the progress-bar callback.
        from lightning.pytorch.callbacks import ProgressBar

        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = instantiate_dict(cfg.get("logger"), "logger")
    log.info(f"Instantiating trainer <{cfg.trainer._target_}>")
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    if trainer.is_global_zero:
        write_text(output_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        write_json(output_dir / "data_info.json", info)
    n_params = sum(p.numel() for p in model.parameters())
    for logger in trainer.loggers:
        logger.log_hyperparams(
            {**OmegaConf.to_container(cfg, resolve=True), "model/params": n_params}
        )

    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    fit_seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics["time/fit_seconds"] = fit_seconds

    best = _best_checkpoint(trainer)
    if cfg.get("predict") and trainer.is_global_zero and not trainer.fast_dev_run:
        from hetero.tasks.inference import encode_particles, write_latents

        if best:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            model.load_state_dict(state)
        device = _inference_device(cfg)
        latents = encode_particles(model, datamodule.predict_dataloader(), device)
        write_latents(output_dir / "latents", latents, model)
        log.info(f"Latents of {latents['z_mu'].shape[0]} particles -> {output_dir / 'latents'}")
    if trainer.is_global_zero:
        write_json(output_dir / "train_metrics.json", metrics)
        log.info(f"Run directory: {output_dir}")
        log.info(f"Next: python analyze.py run_dir={output_dir}")
    return metrics, {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}


def _best_checkpoint(trainer) -> str | None:
    cb = getattr(trainer, "checkpoint_callback", None)
    path = getattr(cb, "best_model_path", "") if cb is not None else ""
    if path and Path(path).is_file():
        return path
    last = getattr(cb, "last_model_path", "") if cb is not None else ""
    return last if last and Path(last).is_file() else None


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
