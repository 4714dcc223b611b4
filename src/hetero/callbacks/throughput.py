"""Training throughput (images per second) and peak accelerator memory, for any model.

Measured between the end of batch ``warmup`` and the end of each epoch's last timed batch
(CUDA synchronised at both ends), summed over DDP ranks. Logged as ``perf/train_images_per_s``
and ``perf/peak_memory_mib`` and, with ``output``, written to a JSON file on rank 0 (what
``benchmarks/gpu_check.py`` reads).

Example usage::

    python train.py model=opusdsd +callbacks.throughput._target_=hetero.callbacks.throughput.Throughput
"""

from __future__ import annotations

import time

import lightning as L
import torch


class Throughput(L.Callback):
    """Images/s over the training batches of each epoch after ``warmup`` batches.

    :param warmup: batches per epoch excluded from the timing (compilation, cache warm-up).
    :param output: optional JSON path; rank 0 writes the last epoch's figures there.
    """

    def __init__(self, warmup: int = 3, output: str | None = None) -> None:
        self.warmup = int(warmup)
        self.output = output
        self._start: float | None = None
        self._images = 0
        self._batches = 0
        self.result: dict = {}

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._images, self._batches = None, 0, 0
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1
        if self._batches == self.warmup:
            self._sync(pl_module)
            self._start = time.perf_counter()
        elif self._batches > self.warmup and isinstance(batch, dict) and "image" in batch:
            self._images += int(batch["image"].shape[0])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._start is None or self._images == 0:
            return
        self._sync(pl_module)
        seconds = time.perf_counter() - self._start
        images = torch.tensor(float(self._images), device=pl_module.device)
        images = trainer.strategy.reduce(images, reduce_op="sum")
        rate = float(images) / seconds
        peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**20 if pl_module.device.type == "cuda" else 0.0
        self.result = {"train_images_per_s": rate, "timed_batches": self._batches - self.warmup,
                       "seconds": seconds, "peak_memory_mib": peak, "world_size": trainer.world_size,
                       "device": str(pl_module.device), "precision": str(trainer.precision)}
        pl_module.log("perf/train_images_per_s", rate, rank_zero_only=True)
        if peak:
            pl_module.log("perf/peak_memory_mib", peak, rank_zero_only=True)
        if self.output and trainer.is_global_zero:
            from hetero.utils.files import write_json

            write_json(self.output, self.result)
