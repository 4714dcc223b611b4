"""The shared checkpoint and non-finite callbacks with models unlike OPUS-DSD: buffers that hold
inf/NaN on purpose (DynaMight's sentinels), EM models without gradients that cannot resume
mid-epoch (class3d), models that step a plain torch optimiser themselves, and samplers
without ``set_epoch``. Tiny modules on 64 random samples: seconds."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import BatchSampler, SequentialSampler

from hetero.callbacks.checkpoint import LastCheckpoint, nonfinite_tensors
from hetero.callbacks.nonfinite import NonFiniteGuard
from hetero.data.loader import ResumableDataLoader
from hetero.utils.errors import NonFiniteError

N, BATCH = 64, 8


def _data() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 4, generator=g), torch.randn(N, generator=g)
    return [{"image": x[i], "y": y[i], "index": torch.tensor(i)} for i in range(N)]


def _loader():
    return torch.utils.data.DataLoader(_data(), batch_size=BATCH)


def _trainer(tmp_path, callbacks, epochs: int = 1, **kw) -> L.Trainer:
    saves = any(isinstance(c, LastCheckpoint) for c in callbacks)
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=saves,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                     default_root_dir=tmp_path, **kw)


class Sentinels(L.LightningModule):
    """A linear model with a buffer that starts at +inf ("no score yet", as DynaMight's
    ``pool_score``) and a running mean that goes NaN at ``nan_epoch``."""

    def __init__(self, nan_epoch: int | None = None) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.register_buffer("best_score", torch.full((3,), float("inf")))
        self.register_buffer("running", torch.zeros(4))
        self.nan_epoch = nan_epoch

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            self.running.add_(batch["image"].mean(0))
            if self.current_epoch == self.nan_epoch:
                self.running.fill_(float("nan"))
        return torch.nn.functional.mse_loss(self.net(batch["image"]).squeeze(-1), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_buffers_that_are_inf_as_built_do_not_block_checkpoints_nan_later_does(tmp_path):
    last = LastCheckpoint(dirpath=str(tmp_path))
    model = Sentinels(nan_epoch=1)
    _trainer(tmp_path, [last], epochs=2).fit(model, _loader())
    saved = torch.load(last.path, weights_only=True)
    # epoch 0 was written although best_score is inf; epoch 1 (running went NaN) was not
    assert saved["epoch"] == 0 and torch.isinf(saved["state_dict"]["best_score"]).all()
    assert torch.isfinite(saved["state_dict"]["running"]).all()
    assert nonfinite_tensors(model) == ["running"]
    assert nonfinite_tensors(model, exempt=()) == ["best_score", "running"]


class EM(L.LightningModule):
    """No optimiser, no gradients: the state is a buffer updated under ``no_grad``, and the
    epoch's running sums live in a plain attribute, so it cannot resume mid-epoch."""

    mid_epoch_checkpoints = False

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(4))
        self.automatic_optimization = False
        self._sum = None

    def on_train_epoch_start(self) -> None:
        self._sum = torch.zeros(4)

    @torch.no_grad()
    def training_step(self, batch, batch_idx) -> None:
        self._sum += batch["image"].sum(0)

    def on_train_epoch_end(self) -> None:
        self.mean.copy_(self._sum / N)

    def configure_optimizers(self):
        return None


def test_a_model_that_cannot_resume_mid_epoch_gets_epoch_end_checkpoints_only(tmp_path):
    last = LastCheckpoint(dirpath=str(tmp_path), every_n_train_steps=3)
    trainer = _trainer(tmp_path, [last], epochs=2)
    model = EM()
    trainer.fit(model, _loader())
    saved = torch.load(last.path, weights_only=True)
    assert (saved["epoch"], saved["global_step"], last.last_reason) == (1, 0, "epoch")
    torch.testing.assert_close(saved["state_dict"]["mean"], torch.stack([d["image"] for d in _data()]).mean(0))
    # a SIGTERM in the middle of an epoch leaves the end of the previous epoch in place
    trainer.state.fn = "fit"
    last.on_exception(trainer, model, SIGTERMException())
    assert last.last_reason == "epoch"


class RawOptimiser(L.LightningModule):
    """Manual optimisation that steps a plain torch optimiser (Lightning's hooks do not see
    the step), with an inf input at batch ``bad``."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = torch.nn.Linear(4, 1)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.1)
        self.bad = bad

    def training_step(self, batch, batch_idx) -> None:
        x = batch["image"] * (float("inf") if batch_idx == self.bad else 1.0)
        loss = torch.nn.functional.mse_loss(self.net(x).squeeze(-1), batch["y"])
        self.opt.zero_grad()
        self.manual_backward(loss)
        self.opt.step()

    def configure_optimizers(self):
        return None


@pytest.mark.parametrize("action", ["stop", "skip"])
def test_a_step_lightning_does_not_see_is_caught_at_the_end_of_the_batch(tmp_path, action):
    guard = NonFiniteGuard(action=action)
    with pytest.raises(NonFiniteError, match=r"does not see .* particles \(0-based rows\) \[16, 17"):
        _trainer(tmp_path, [guard]).fit(RawOptimiser(bad=2), _loader())


class Accumulating(L.LightningModule):
    def __init__(self, bad: int) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.bad = bad

    def training_step(self, batch, batch_idx):
        x = batch["image"] * (float("nan") if batch_idx == self.bad else 1.0)
        return torch.nn.functional.mse_loss(self.net(x).squeeze(-1), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_gradient_accumulation_names_every_batch_of_the_step(tmp_path):
    guard = NonFiniteGuard()
    trainer = _trainer(tmp_path, [guard], accumulate_grad_batches=2)
    model = Accumulating(bad=2)  # the first batch of the second step
    with pytest.raises(NonFiniteError, match=r"step 1 .*\[16, 17, .*, 30, 31\]"):
        trainer.fit(model, _loader())
    assert not nonfinite_tensors(model)


def test_resumable_loader_with_a_sampler_without_set_epoch():
    sampler = BatchSampler(SequentialSampler(range(N)), BATCH, drop_last=False)
    progress = {"value": (2, 3, N // BATCH)}
    loader = ResumableDataLoader(_data(), batch_sampler=sampler, progress=lambda: progress["value"])
    state = loader.state_dict()
    again = ResumableDataLoader(_data(), batch_sampler=BatchSampler(SequentialSampler(range(N)), BATCH, False))
    again.load_state_dict(state)
    first = next(iter(again))["index"].tolist()
    assert first == list(range(3 * BATCH, 4 * BATCH))  # continues after the 3 batches done
    assert next(iter(again))["index"].tolist() == list(range(BATCH))  # then whole epochs again
