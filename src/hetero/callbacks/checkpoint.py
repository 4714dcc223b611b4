"""Checkpoints a user can trust: ``best.ckpt`` and ``last.ckpt``, never with NaN weights.

``<run>/checkpoints/`` holds two files (``conf/callbacks/default.yaml``):

* ``best.ckpt`` (:class:`BestCheckpoint`): the best by the monitored metric
  (``optimized_metric``, ``val/loss``). A non-finite metric never counts as best.
* ``last.ckpt`` (:class:`LastCheckpoint`): the end of the latest epoch, always (Lightning's
  ``save_last`` writes it only in epochs where the best one improved); optionally also every
  N optimiser steps; and when the run gets SIGTERM (the scheduler's stop signal) at the next
  batch boundary. Mid-epoch checkpoints resume exactly: the training loader saves its position
  (:class:`~hetero.data.loader.ResumableDataLoader`) and
  :class:`~hetero.callbacks.random_state.RandomStateCheckpoint` the random generators.

Both refuse to write a model whose parameters or buffers hold NaN/inf (the previous file stays,
so the last good checkpoint remains resumable; the decision is taken on all DDP ranks together)
and write through a temporary file renamed into place, so a run killed while saving leaves the
previous checkpoint intact. Buffers that hold NaN/inf *as built* (sentinels such as an
``inf`` "no score yet") are exempt, as are those a model lists in its attribute
``nonfinite_buffers`` (names or name prefixes).

**A model's own state.** Everything in ``state_dict`` (parameters and persistent buffers) and
what the LightningModule's ``on_save_checkpoint`` / ``on_load_checkpoint`` hooks add is saved
and restored, at epoch ends and mid-epoch alike. A model that keeps per-epoch state elsewhere
(e.g. the sufficient statistics of an EM epoch in plain attributes) and cannot resume in the
middle of an epoch sets ``mid_epoch_checkpoints = False``: then ``last.ckpt`` is written only
at epoch ends (SIGTERM and the every-N-steps option leave the previous epoch's file in place).

Requeue signals (SLURM: Lightning's ``SIGUSR1`` handler or submitit's ``SIGUSR2``) arrive at any
moment; :class:`LastCheckpoint` defers the handler that is installed to the next batch boundary
and saves ``last.ckpt`` first, so the requeued job resumes from a consistent state.

Works for every LightningModule (automatic or manual optimisation, any number of optimisers).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from weakref import proxy

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)

__all__ = ["BestCheckpoint", "LastCheckpoint", "nonfinite_tensors", "save_checkpoint_atomic", "sentinel_buffers"]


def nonfinite_tensors(module: torch.nn.Module, exempt: tuple[str, ...] | None = None) -> list[str]:
    """Names of the floating-point parameters and buffers of ``module`` holding NaN or inf.

    :param exempt: buffer names (or name prefixes) not to check; default: the module's sentinel
        buffers (:func:`sentinel_buffers`, recorded when training starts) and its
        ``nonfinite_buffers`` attribute.
    """
    if exempt is None:
        exempt = (*getattr(module, SENTINELS, ()), *getattr(module, "nonfinite_buffers", ()))

    def skipped(name: str) -> bool:
        return any(name == e or name.startswith(e + ".") for e in exempt)

    tensors = [*module.named_parameters(), *((n, b) for n, b in module.named_buffers() if not skipped(n))]
    return [name for name, t in tensors
            if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all())]


#: module attribute caching the buffers that held NaN/inf when training started
SENTINELS = "_hetero_sentinel_buffers"


def sentinel_buffers(module: torch.nn.Module) -> tuple[str, ...]:
    """Record (once per module) and return the buffers that hold NaN/inf before training starts.

    Called from the checkpoint callbacks' ``setup``, which Lightning runs before a checkpoint is
    restored: the values are the model's as built, where NaN/inf can only be deliberate
    (DynaMight's ``pool_score`` starts at ``inf``). Such buffers are not checked before saving.
    """
    if not hasattr(module, SENTINELS):
        names = tuple(n for n, b in module.named_buffers()
                      if b is not None and b.is_floating_point() and not bool(torch.isfinite(b).all()))
        object.__setattr__(module, SENTINELS, names)
        if names:
            log.debug(f"Buffers holding NaN/inf as built (not checked before saving): {', '.join(names)}")
    return getattr(module, SENTINELS)


def _fitting(trainer: L.Trainer) -> bool:
    from lightning.pytorch.trainer.states import TrainerFn

    return not (trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING)


def save_checkpoint_atomic(trainer: L.Trainer, filepath: str | Path, weights_only: bool = False) -> bool:
    """``trainer.save_checkpoint`` through a temporary file renamed into place (all ranks call).

    :return: ``False`` (and nothing written) when the model holds NaN/inf values.
    """
    bad = nonfinite_tensors(trainer.lightning_module)
    # buffers may differ between DDP ranks: every rank must take the same branch
    if not trainer.strategy.reduce_boolean_decision(not bad, all=True):
        log.error(
            f"Not writing {filepath}: the model holds NaN/inf values in "
            f"{', '.join(bad[:5]) if bad else 'a tensor on another rank'}{' ...' if len(bad) > 5 else ''}; "
            "the previous checkpoint is kept (a buffer whose NaN/inf values are meant, e.g. a "
            "sentinel, belongs in the model's `nonfinite_buffers`)"
        )
        return False
    path = Path(filepath)
    tmp = path.with_name(f".{path.name}.partial")
    trainer.save_checkpoint(tmp, weights_only)
    if trainer.is_global_zero:
        os.replace(tmp, path)
    trainer.strategy.barrier("hetero.save_checkpoint_atomic")
    return True


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that never saves NaN weights or a non-finite metric as
    best, and writes atomically. Same arguments (use ``save_last=False``: see
    :class:`LastCheckpoint`)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        sentinel_buffers(pl_module)
        super().setup(trainer, pl_module, stage)

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        if current is not None and not bool(torch.isfinite(torch.as_tensor(current)).all()):
            log.warning(
                f"{self.monitor} is {float(current)} at epoch {trainer.current_epoch}: "
                f"not a candidate for {self.filename}.ckpt"
            )
            return False
        return super().check_monitor_top_k(trainer, current)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if not save_checkpoint_atomic(trainer, filepath, self.save_weights_only):
            return
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


class LastCheckpoint(Checkpoint):
    """``<dirpath>/<filename>.ckpt`` at the end of every training epoch, optionally every
    ``every_n_train_steps`` optimiser steps, and on SIGTERM.

    A Lightning ``Checkpoint``, so the trainer runs it after the other callbacks and after a
    :class:`BestCheckpoint` listed before it: the file holds their state of this epoch (e.g.
    which epoch is best so far), not the previous one's.

    :param dirpath: folder of the checkpoint (``<run>/checkpoints``).
    :param filename: file stem (``last``).
    :param every_n_train_steps: also save after every N optimiser steps (``None``: only at the
        end of each epoch). Use it when an epoch takes longer than you can afford to lose.
    :param save_on_sigterm: save when Lightning stops the run on SIGTERM (the run then exits
        with status 143 and resumes with ``ckpt_path=last``).
    :param defer_signals: signal names whose Python handlers (a scheduler's requeue handler) are
        run only at the next batch boundary, after saving.
    """

    def __init__(
        self,
        dirpath: str,
        filename: str = "last",
        every_n_train_steps: int | None = None,
        save_on_sigterm: bool = True,
        defer_signals: tuple[str, ...] | list[str] = ("SIGUSR1", "SIGUSR2"),
    ) -> None:
        if every_n_train_steps is not None and int(every_n_train_steps) < 1:
            raise ValueError(f"every_n_train_steps must be >= 1 or null, got {every_n_train_steps}")
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.every_n_train_steps = None if every_n_train_steps is None else int(every_n_train_steps)
        self.save_on_sigterm = bool(save_on_sigterm)
        self.defer_signals = tuple(defer_signals)
        self._saved_step: int | None = None
        self._pending: list[tuple[int, object]] = []
        self._wrapped: dict[int, object] = {}
        #: why the file was last written: "epoch", "step", "SIGTERM" or "signal"
        self.last_reason: str | None = None
        self._told_mid_epoch = False

    @property
    def path(self) -> Path:
        return self.dirpath / f"{self.filename}.ckpt"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        sentinel_buffers(pl_module)

    def save(self, trainer: L.Trainer, reason: str) -> bool:
        """Write the checkpoint now (all ranks must call); ``False`` if nothing was written."""
        if not _fitting(trainer):
            return False
        if reason != "epoch" and not getattr(trainer.lightning_module, "mid_epoch_checkpoints", True):
            if not self._told_mid_epoch:
                self._told_mid_epoch = True
                log.warning(
                    f"{type(trainer.lightning_module).__name__} cannot resume in the middle of an "
                    f"epoch (mid_epoch_checkpoints = False): {self.path} is written at epoch ends "
                    f"only; not on {reason} at epoch {trainer.current_epoch}, step {trainer.global_step}"
                )
            return False
        if not save_checkpoint_atomic(trainer, self.path):
            return False
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.save()  # the logged history reaches disk with the state it belongs to
        self._saved_step = trainer.global_step
        self.last_reason = reason
        log.debug(f"{self.path} written ({reason}, epoch {trainer.current_epoch}, step {trainer.global_step})")
        return True

    # -- when -----------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_train_steps
        step = trainer.global_step
        if n and step > 0 and step % n == 0 and step != self._saved_step:
            self.save(trainer, "step")
        if self._pending:
            self._run_deferred(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.save(trainer, "epoch")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.save_on_sigterm and isinstance(exception, SIGTERMException):
            if self.save(trainer, "SIGTERM"):
                log.warning(
                    f"SIGTERM: saved {self.path} at epoch {trainer.current_epoch}, step "
                    f"{trainer.global_step}; resume with hydra.run.dir=<this run> ckpt_path=last"
                )

    # -- deferred requeue signals ---------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.defer_signals:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            handler = signal.getsignal(signum)
            if callable(handler) and signum not in self._wrapped:
                self._wrapped[signum] = handler
                signal.signal(signum, self._defer)

    def _defer(self, signum, frame) -> None:
        self._pending.append((signum, frame))

    def _run_deferred(self, trainer) -> None:
        pending, self._pending = self._pending, []
        names = ", ".join(signal.Signals(s).name for s, _ in pending)
        if self.save(trainer, "signal"):
            log.warning(f"{self.path} saved before handling {names}")
        for signum, frame in pending:
            handler = self._wrapped.get(signum)
            if callable(handler):
                handler(signum, frame)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for signum, handler in self._wrapped.items():
            if signal.getsignal(signum) == self._defer:
                signal.signal(signum, handler)
        self._wrapped = {}
