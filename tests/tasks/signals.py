"""Test callbacks that interrupt a training run at a known point (importable by subprocesses)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import torch


class SignalAt(L.Callback):
    """Send ``signal`` to this process once, right after optimiser step ``step``.

    The ``marker`` file makes it happen once per run directory: the resumed run (same config)
    finds it and carries on.
    """

    def __init__(self, step: int, marker: str, signal: str = "SIGKILL") -> None:
        self.step = int(step)
        self.marker = Path(marker)
        self.signal = signal

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(f"{self.signal} at step {self.step}\n")
            os.kill(os.getpid(), getattr(signal, self.signal))


class PoisonParticle(L.Callback):
    """Replace the images of particles ``indices`` (table rows) with ``value`` whenever a
    training (and, with ``validation``, a validation) batch holds them, from epoch
    ``from_epoch`` on: what damaged images that got past the loader would do."""

    def __init__(self, indices, value: float = float("nan"), from_epoch: int = 0,
                 validation: bool = True) -> None:
        self.indices = torch.as_tensor(list(indices), dtype=torch.int64)
        self.value = float(value)
        self.from_epoch = int(from_epoch)
        self.validation = bool(validation)

    def _poison(self, trainer, batch) -> None:
        if trainer.current_epoch < self.from_epoch:
            return
        hit = torch.isin(batch["index"], self.indices.to(batch["index"].device))
        if bool(hit.any()):
            batch["image"][hit] = torch.tensor(self.value, dtype=batch["image"].dtype)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._poison(trainer, batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.validation:
            self._poison(trainer, batch)
