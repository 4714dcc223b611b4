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
    """Replace the image of particle ``index`` (a table row) with ``value`` whenever a training
    batch holds it: what a damaged image that got past the loader would do."""

    def __init__(self, index: int, value: float = float("nan")) -> None:
        self.index = int(index)
        self.value = float(value)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        hit = batch["index"] == self.index
        if bool(hit.any()):
            batch["image"][hit] = torch.tensor(self.value, dtype=batch["image"].dtype)
