"""A non-finite loss at the training layer: stopped naming the particles, or skipped on request;
NaN weights never reach best.ckpt / last.ckpt, and the last good checkpoint resumes.

The damaged images are simulated after the loader (``tests.tasks.signals.PoisonParticle``),
since the loader itself refuses them: particles in the first and the last training batch of an
epoch and in the validation set.
"""

from __future__ import annotations

import hydra
import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import open_dict

from hetero.callbacks.checkpoint import nonfinite_tensors
from hetero.callbacks.nonfinite import NonFiniteGuard
from hetero.tasks.train import train
from hetero.utils.errors import NonFiniteError
from tests.helpers import TINY_OPUSDSD, compose_train


def positions(cfg, epoch: int = 0) -> dict[str, int]:
    """Table rows of a particle in the first / last training batch of ``epoch`` and in the
    validation set."""
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    batches = dm.make_train_batch_sampler().rank_batches(epoch)
    return {"first": int(dm.train_dataset.indices[batches[0][0]]),
            "last": int(dm.train_dataset.indices[batches[-1][-1]]),
            "val": int(dm.val_indices[0])}


def poison(cfg, rows, **kw) -> None:
    with open_dict(cfg):
        cfg.callbacks.poison = {"_target_": "tests.tasks.signals.PoisonParticle", "indices": list(rows), **kw}


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_stop_names_the_batch_and_leaves_a_resumable_checkpoint(tmp_path):
    cfg = compose_train(tmp_path, ["trainer.max_epochs=2", "model.init_backprojection=false"])
    rows = positions(cfg, epoch=1)
    poison(cfg, [rows["first"]], from_epoch=1)
    with pytest.raises(NonFiniteError) as err:
        train(cfg)
    message = str(err.value)
    assert "epoch 1" in message and "batch 1 of the epoch" in message
    assert f"particle rows {rows['first'] + 1} (" in message or f", {rows['first'] + 1} (" in message
    assert "callbacks.nonfinite.action=skip" in message
    last = load(tmp_path / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 0 and finite(last["state_dict"])

    resumed = compose_train(tmp_path, ["trainer.max_epochs=2", "model.init_backprojection=false",
                                       "ckpt_path=last"])
    metrics, objects = train(resumed)
    assert objects["trainer"].global_step == 2 * last["global_step"]
    assert np.isfinite(metrics["val/loss"]) and not nonfinite_tensors(objects["model"])


def test_skip_counts_steps_keeps_weights_buffers_and_checkpoints_finite(tmp_path):
    cfg = compose_train(tmp_path, ["trainer.max_epochs=1", *TINY_OPUSDSD,
                                   "callbacks.nonfinite.action=skip"])
    rows = positions(cfg)
    poison(cfg, [rows["first"], rows["last"], rows["val"]])
    metrics, objects = train(cfg)
    model, trainer = objects["model"], objects["trainer"]
    guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
    assert guard.skipped == 2  # the first and the last batch
    n_batches = trainer.num_training_batches
    assert trainer.global_step == n_batches  # Lightning counts the step; the weights did not move
    assert not nonfinite_tensors(model)  # parameters and buffers (memory bank, SNR)
    assert metrics["train/nonfinite_skips"] == 2
    # the validation set held a NaN image: val/loss is NaN, so there is no best checkpoint
    assert not np.isfinite(metrics["val/loss"])
    assert not (tmp_path / "checkpoints" / "best.ckpt").exists()
    assert finite(load(tmp_path / "checkpoints" / "last.ckpt")["state_dict"])


def test_without_the_guard_nan_weights_are_never_checkpointed(tmp_path):
    cfg = compose_train(tmp_path, ["trainer.max_epochs=2", "model.init_backprojection=false",
                                   "callbacks.nonfinite=null"])
    rows = positions(cfg, epoch=1)
    poison(cfg, [rows["last"]], from_epoch=1, validation=False)
    _, objects = train(cfg)
    assert nonfinite_tensors(objects["model"]) == ["volume"]  # the run itself went NaN ...
    for name in ("best", "last"):  # ... but its checkpoints are the last finite ones
        saved = load(tmp_path / "checkpoints" / f"{name}.ckpt")
        assert saved["epoch"] == 0 and finite(saved["state_dict"])


class ManualEM(L.LightningModule):
    """Manual optimisation with two optimisers and a running buffer, like an EM model or a
    pair of half-set networks: shows the guard needs nothing from the model."""

    def __init__(self, bad_step: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a = torch.nn.Linear(4, 1)
        self.b = torch.nn.Linear(4, 1)
        self.register_buffer("running", torch.zeros(4))
        self.bad_step = bad_step

    def training_step(self, batch, batch_idx):
        x, y = batch["image"], batch["y"]
        if batch_idx == self.bad_step:
            x = x * float("inf")
        self.running.add_(x.mean(0))
        for net, opt in zip((self.a, self.b), self.optimizers()):
            loss = torch.nn.functional.mse_loss(net(x).squeeze(-1), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)]


def _loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randn(64, generator=g)
    data = [{"image": x[i], "y": y[i], "index": torch.tensor(i)} for i in range(64)]
    return torch.utils.data.DataLoader(data, batch_size=8)


@pytest.mark.parametrize("action", ["stop", "skip"])
def test_manual_optimisation_with_two_optimisers(tmp_path, action):
    model = ManualEM(bad_step=3)
    guard = NonFiniteGuard(action=action)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[guard],
                        default_root_dir=tmp_path)
    if action == "stop":
        with pytest.raises(NonFiniteError, match=r"particles \(0-based rows\) \[24, 25"):
            trainer.fit(model, _loader())
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())  # never stepped
        return
    trainer.fit(model, _loader())
    assert guard.skipped == 1 and not nonfinite_tensors(model)
    # the buffer update of the skipped batch was undone: 7 of 8 batch means were added
    x = torch.stack([d["image"] for d in _loader().dataset])
    expected = sum(x[i * 8 : (i + 1) * 8].mean(0) for i in range(8) if i != 3)
    torch.testing.assert_close(model.running, expected)
