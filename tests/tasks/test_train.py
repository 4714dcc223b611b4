"""Training task end to end on tiny synthetic data: fast_dev_run, resume, DDP, sweeps, wandb."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from hetero.analysis.latents import CheckpointId
from hetero.tasks.train import train
from hetero.utils.errors import ConfigError
from tests.helpers import (
    TINY_DATA,
    TINY_OPUSDSD,
    TINY_PARTICLES,
    assert_ranks_agree,
    compose_train,
    ddp_dump_overrides,
)

REPO = Path(__file__).resolve().parents[2]
MODELS = {"homogeneous": [], "opusdsd": TINY_OPUSDSD}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_fast_dev_run(tmp_path, model):
    cfg = compose_train(tmp_path, [*MODELS[model], "trainer.fast_dev_run=true"])
    metrics, objects = train(cfg)
    assert np.isfinite(metrics["train/loss"])
    assert (tmp_path / "config_resolved.yaml").is_file()
    assert (tmp_path / "data_info.json").is_file()


def test_train_predict_and_resume(tmp_path):
    # best by a metric that never improves after epoch 0: last.ckpt must still follow every epoch
    never = ["callbacks.model_checkpoint.monitor=epoch", "callbacks.model_checkpoint.mode=min"]
    cfg = compose_train(tmp_path, ["trainer.max_epochs=1", "predict=true", *never])
    _, objects = train(cfg)
    steps_one_epoch = objects["trainer"].global_step
    ckpts = tmp_path / "checkpoints"
    assert {p.name for p in ckpts.iterdir()} == {"best.ckpt", "last.ckpt"}
    # The manifest names the kept checkpoint and the latents it made (keyed by its SHA-256).
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["method"] == "homogeneous" and manifest["format"] == 1
    assert manifest["result_loader"] == "hetero.analysis.result.load_model_result"
    assert manifest["parts"]["model"]["path"] == "checkpoints/best.ckpt"
    latents = tmp_path / manifest["parts"]["latents"]["path"]
    best = CheckpointId.of(ckpts / "best.ckpt")
    assert latents.name == best.key
    assert json.loads((latents / "source.json").read_text())["checkpoint"]["sha256"] == best.sha256
    z = np.load(latents / "z_mu.npy")
    assert z.shape == (400, 0)
    split = np.load(tmp_path / "split.npz")

    cfg2 = compose_train(tmp_path, ["trainer.max_epochs=2", "ckpt_path=last", *never])
    _, objects2 = train(cfg2)
    assert objects2["trainer"].global_step == 2 * steps_one_epoch
    load = lambda name: torch.load(ckpts / f"{name}.ckpt", weights_only=True)  # noqa: E731
    assert (load("best")["epoch"], load("last")["epoch"]) == (0, 1)
    assert load("last")["global_step"] == 2 * steps_one_epoch
    split2 = np.load(tmp_path / "split.npz")
    for key in split.files:
        np.testing.assert_array_equal(split[key], split2[key])
    # Only best + last are kept on disk.
    assert {p.name for p in ckpts.iterdir()} == {"best.ckpt", "last.ckpt"}
    # Resuming a run that has trained its epochs is refused before anything is overwritten.
    before = {name: (tmp_path / name).read_bytes() for name in ("train_metrics.json", "config_resolved.yaml")}
    for epochs in (2, 1):
        with pytest.raises(ConfigError, match="has trained 2 epochs and trainer.max_epochs is"):
            train(compose_train(tmp_path, [f"trainer.max_epochs={epochs}", "ckpt_path=last", *never]))
    assert before == {name: (tmp_path / name).read_bytes() for name in before}


def test_homogeneous_fit_improves_validation(tmp_path):
    """A couple of epochs lower the validation error below that of an empty volume."""
    cfg = compose_train(tmp_path, ["trainer.max_epochs=2", "model.init_backprojection=false",
                                   "optim.optimizer.lr=0.01"])
    metrics, objects = train(cfg)
    model, dm = objects["model"], objects["datamodule"]
    batch = next(iter(dm.val_dataloader()))
    empty = torch.mean(model.targets(batch) ** 2).item()
    assert metrics["val/loss"] < 0.9 * empty


def test_ddp_sim_homogeneous_ranks_start_and_stay_identical(tmp_path):
    """Two CPU processes with disjoint shards: the initial backprojection is all-reduced, so
    both ranks start from the same map and DDP keeps them equal (before: relative difference
    0.70 after an epoch). The OPUS-DSD ranks are compared in the memory-bank test below."""
    dump = tmp_path / "params"
    cfg = compose_train(tmp_path, ["trainer=ddp_sim", "trainer.max_epochs=1", *ddp_dump_overrides(dump)])
    with open_dict(cfg):
        cfg.trainer.enable_progress_bar = False
    metrics, _ = train(cfg)
    state = assert_ranks_agree(dump)
    assert state["volume"].abs().max() > 0  # started from the backprojection, not zeros
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert np.isfinite(metrics["val/loss"])


def test_ddp_sim_keeps_the_memory_bank_identical_on_both_ranks(tmp_path):
    """Two CPU processes, disjoint sampler shards: every rank's bank holds every rank's
    updates (gathered), so after one epoch both banks are identical and cover the whole
    training set, and the images-seen clock counts both ranks."""
    dump = tmp_path / "banks"
    cfg = compose_train(tmp_path, [
        "trainer=ddp_sim", "trainer.max_epochs=1", *TINY_OPUSDSD,
        "++callbacks.bank_dump._target_=tests.helpers.BankDump", f"++callbacks.bank_dump.folder={dump}",
        *ddp_dump_overrides(tmp_path / "params"),
    ])
    metrics, objects = train(cfg)
    assert_ranks_agree(tmp_path / "params")  # weights, bank and SNR buffers alike
    banks = [np.load(dump / f"bank_rank{r}.npz") for r in (0, 1)]
    np.testing.assert_array_equal(banks[0]["codes"], banks[1]["codes"])
    np.testing.assert_array_equal(banks[0]["seen"], banks[1]["seen"])
    n_train = objects["datamodule"].info()["n_train"]
    assert int(banks[0]["seen"].sum()) == n_train
    assert int(banks[0]["images_seen"]) == int(banks[1]["images_seen"]) == n_train


def test_multirun_subprocess(tmp_path):
    """A 2-job sweep through the real CLI."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    cmd = [
        sys.executable, str(REPO / "train.py"), "-m", "trainer=cpu", "trainer.fast_dev_run=true",
        "extras.print_config=false", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
        "data.split_seed=0,1", f"hydra.sweep.dir={tmp_path}", *TINY_PARTICLES, *TINY_DATA,
    ]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        assert (tmp_path / job / "config_resolved.yaml").is_file()


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    # fast_dev_run swaps loggers for a dummy, so run two real steps instead.
    cfg = compose_train(
        tmp_path,
        ["logger=wandb", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"],
    )
    from hetero.tasks.train import run

    run(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, list(tmp_path.rglob("*"))[:20]


def test_disabling_the_progress_bar_drops_the_progress_callback(tmp_path):
    """`trainer.enable_progress_bar=false` with the default progress-bar callback still runs."""
    cfg = compose_train(tmp_path, [
        "trainer.fast_dev_run=true", "trainer.enable_progress_bar=false",
        "++callbacks.progress_bar={_target_:hetero.callbacks.progress.progress_bar}",
    ])
    assert cfg.callbacks.progress_bar is not None
    metrics, objects = train(cfg)
    assert not objects["trainer"].progress_bar_callback
