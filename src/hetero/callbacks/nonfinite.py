"""Stop (or skip) a training step whose loss or gradients are NaN/inf, before it reaches the weights.

Without it one non-finite loss (a damaged image that slipped through, a learning rate too
high, an overflow) turns every weight into NaN, and the run carries on writing NaN checkpoints.
:class:`NonFiniteGuard` checks the loss before backward and the gradients before every
optimiser step (Lightning's ``on_before_backward`` / ``on_before_optimizer_step`` hooks, which
run for automatic and manual optimisation alike, for any number of optimisers):

* ``action="stop"`` (default): raise :class:`~hetero.utils.errors.NonFiniteError` naming the
  epoch, step and the batch's particles (from ``batch["index"]``, as rows of the user's file).
  The optimiser step does not happen, so the weights stay finite and ``last.ckpt`` (end of the
  previous epoch) resumes.
* ``action="skip"``: drop the step (gradients cleared, so the optimiser leaves weights and its
  state alone), restore the model's buffers as they were before the batch (e.g. OPUS-DSD's
  memory bank and SNR estimate, which ``training_step`` updates), count it and log it;
  ``train/nonfinite_skips`` is logged. More than ``max_skips`` skipped steps stop the run.

With fp16 mixed precision the gradient scaler itself skips steps with inf gradients (that is
how it finds its scale), so only the loss is checked there. Under DDP the decision is made on
all ranks together (one all-reduce of a flag per step), so no rank is left waiting. With
gradient accumulation the losses and particles of every batch since the last step count.

Models that step a plain ``torch.optim`` optimiser themselves (not the one ``self.optimizers()``
returns) bypass ``on_before_optimizer_step``; for them a non-finite loss passed to
``manual_backward`` is caught at the end of the batch: the run stops if the parameters went
non-finite (whatever ``action`` says: such a step cannot be undone). Models without gradients
(EM updates under ``no_grad``) are guarded by the data checks and by the checkpoint callbacks,
which never write NaN/inf state (:mod:`hetero.callbacks.checkpoint`).
"""

from __future__ import annotations

import lightning as L
import torch

from hetero.utils.errors import NonFiniteError
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)

__all__ = ["NonFiniteGuard"]

ACTIONS = ("stop", "skip")


def _grad_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])
    )


class NonFiniteGuard(L.Callback):
    """See the module docstring.

    :param action: ``"stop"`` or ``"skip"`` (config key ``callbacks.nonfinite.action``).
    :param check_gradients: also check gradients (not only the loss).
    :param max_skips: with ``"skip"``, stop once more steps than this were skipped (``None``:
        never).
    """

    def __init__(self, action: str = "stop", check_gradients: bool = True, max_skips: int | None = None):
        if action not in ACTIONS:
            raise ValueError(f"callbacks.nonfinite.action must be one of {ACTIONS}, got {action!r}")
        self.action = action
        self.check_gradients = bool(check_gradients)
        self.max_skips = None if max_skips is None else int(max_skips)
        #: steps skipped so far in this run (``action="skip"``)
        self.skipped = 0
        self._indices: list[torch.Tensor] = []
        self._loss_ok: torch.Tensor | None = None
        self._loss_value: torch.Tensor | None = None
        self._buffers: dict[str, torch.Tensor] | None = None
        self._batch_skipped = False
        self._batch_decided = False
        self._stepped = True  # an optimiser step (or its decision) since the window started

    # -- per batch ------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._stepped:  # a new window of batches until the next optimiser step
            self._indices, self._loss_ok, self._stepped = [], None, False
            if self.action == "skip":
                self._buffers = {n: b.detach().clone() for n, b in pl_module.named_buffers()}
        index = batch.get("index") if isinstance(batch, dict) else None
        if index is not None:
            self._indices.append(index.detach())
        self._batch_skipped = False
        self._batch_decided = False

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        ok = torch.isfinite(loss.detach()).all()
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok
        self._loss_value = loss.detach()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        ok = self._loss_ok if self._loss_ok is not None else torch.tensor(True)
        grad_ok = True
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self.check_gradients and scaler is None:
            norm = _grad_norm(optimizer)
            if norm is not None:
                grad_ok = bool(torch.isfinite(norm))
        loss_ok = bool(ok)
        good = trainer.strategy.reduce_boolean_decision(loss_ok and grad_ok, all=True)
        self._loss_ok, self._stepped, self._batch_decided = None, True, True
        if good:
            return
        what = "loss" if not loss_ok else ("gradient" if not grad_ok else "loss or gradient on another rank")
        where = (f"epoch {trainer.current_epoch}, step {trainer.global_step} (batch "
                 f"{trainer.fit_loop.epoch_loop.batch_idx + 1} of the epoch)")
        particles = self._describe(trainer)
        value = f" ({float(self._loss_value):g})" if not loss_ok and self._loss_value is not None else ""
        if self.action == "skip":
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # the optimiser skips parameters without gradients
            self._restore_buffers(pl_module)
            if not self._batch_skipped:
                self._batch_skipped = True
                self.skipped += 1
            log.warning(f"Skipped a training step with a non-finite {what}{value} at {where}; "
                        f"batch: {particles} ({self.skipped} skipped so far)")
            if self.max_skips is not None and self.skipped > self.max_skips:
                raise NonFiniteError(
                    f"{self.skipped} training steps had a non-finite loss or gradient "
                    f"(callbacks.nonfinite.max_skips={self.max_skips}); the last at {where}, "
                    f"batch: {particles}"
                )
            return
        raise NonFiniteError(
            f"Training stopped: non-finite {what}{value} at {where}. The weights were not "
            f"updated with it. The batch held {particles}. Likely causes: a damaged image "
            "(check the data with `python -m hetero.data.check <particles>`), a learning rate "
            "too high for this data (optim.optimizer.lr), or an overflow in reduced precision "
            "(trainer.precision=32-true). checkpoints/last.ckpt (end of the last complete epoch) "
            "resumes with ckpt_path=last; to skip such steps instead pass "
            "callbacks.nonfinite.action=skip."
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._loss_ok is not None and not self._batch_decided:
            self._check_unguarded_step(trainer, pl_module)
        if self.action == "skip":
            pl_module.log("train/nonfinite_skips", float(self.skipped), on_step=True, on_epoch=False,
                          reduce_fx="max", rank_zero_only=True)

    def _check_unguarded_step(self, trainer, pl_module) -> None:
        """A loss went through backward but no Lightning optimiser stepped in this batch
        (gradient accumulation, or a model stepping its optimisers itself): stop if the loss
        was non-finite and the parameters are no longer finite."""
        loss_ok = bool(self._loss_ok)
        if not pl_module.automatic_optimization:
            self._stepped = True  # manual optimisation does not accumulate across batches
        if trainer.strategy.reduce_boolean_decision(loss_ok, all=True):
            return
        params_ok = all(bool(torch.isfinite(p).all()) for p in pl_module.parameters() if p.is_floating_point())
        if trainer.strategy.reduce_boolean_decision(params_ok, all=True):
            return  # not stepped yet (accumulation: the step's check acts) or the model held back
        raise NonFiniteError(
            f"Training stopped: a non-finite loss at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step} reached the weights through an optimiser step that Lightning "
            f"does not see (the model steps its optimiser itself), so it could not be "
            f"{'skipped' if self.action == 'skip' else 'stopped before the update'}. The batch held "
            f"{self._describe(trainer)}. checkpoints/last.ckpt (end of the last complete epoch) "
            "resumes with ckpt_path=last."
        )

    # -- helpers --------------------------------------------------------------------------
    def _restore_buffers(self, pl_module) -> None:
        if not self._buffers:
            return
        with torch.no_grad():
            for name, buf in pl_module.named_buffers():
                saved = self._buffers.get(name)
                if saved is not None and saved.shape == buf.shape:
                    buf.copy_(saved)

    def _describe(self, trainer) -> str:
        if not self._indices:
            return "particles not known (the batch has no 'index')"
        index = torch.cat([i.reshape(-1).cpu() for i in self._indices])
        describe = getattr(trainer.datamodule, "describe_particles", None)
        if callable(describe):
            return describe(index)
        return f"particles (0-based rows) {index.tolist()}"

    # -- resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
