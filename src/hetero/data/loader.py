"""A training DataLoader that knows where it stopped: mid-epoch checkpoints resume exactly.

Lightning saves the state of a training DataLoader that implements ``state_dict`` /
``load_state_dict`` in every checkpoint and hands it back on resume, before the epoch's
iterator is created. :class:`ResumableDataLoader` records the epoch and how many of its
batches were trained on; on resume it sets its batch sampler to that epoch and skips those
batches (indices only, no pixels are read), so a run stopped mid-epoch (SIGTERM, a checkpoint
every N steps) continues with exactly the batches an uninterrupted run would have seen. From
an end-of-epoch checkpoint it selects the next epoch's shuffle.

Its batch sampler must yield the same batches for the same epoch: shuffling samplers take the
epoch through ``set_epoch(epoch)`` (every shuffling sampler in :mod:`hetero.data.samplers`);
a sampler without ``set_epoch`` must yield the same batches in every epoch (e.g. the
sequential one EM models use).

Example usage::

    loader = ResumableDataLoader(dataset, batch_sampler=sampler, progress=lambda: (epoch, done, n))
    state = loader.state_dict()        # {"epoch": 3, "batches_done": 17, "batches_per_epoch": 40, ...}
    loader.load_state_dict(state)          # the next iter() starts at batch 18 of epoch 3
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, Sampler

from hetero.data.io.errors import InputError

__all__ = ["ResumableDataLoader"]


class _SkipFirst(Sampler):
    """Wraps a batch sampler; the next iteration skips ``skip`` batches (then it resets)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.skip = 0

    @property
    def sampler(self):
        # Lightning calls set_epoch on ``batch_sampler.sampler``.
        return getattr(self.inner, "sampler", self.inner)

    @property
    def epoch(self) -> int | None:
        return getattr(self.inner, "epoch", None)

    def set_epoch(self, epoch: int) -> None:
        set_epoch = getattr(self.inner, "set_epoch", None)
        if callable(set_epoch):  # samplers without it yield the same batches every epoch
            set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(self.inner):
            if i >= skip:
                yield batch


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a batch sampler whose position is saved in checkpoints.

    :param progress: ``() -> (epoch, batches trained in it, batches per epoch)``, read when a
        checkpoint is saved (the data module reads them from its trainer).
    Other arguments are ``DataLoader``'s; ``batch_sampler`` is required.
    """

    def __init__(
        self, *args, progress: Callable[[], tuple[int, int, int]] | None = None, **kwargs
    ) -> None:
        sampler = kwargs.pop("batch_sampler", None)
        if sampler is None:
            raise ValueError("ResumableDataLoader needs a batch_sampler")
        super().__init__(*args, batch_sampler=_SkipFirst(sampler), **kwargs)
        self._progress = progress

    def state_dict(self) -> dict[str, Any]:
        epoch, done, per_epoch = self._progress() if self._progress is not None else (0, 0, len(self))
        return {"epoch": int(epoch), "batches_done": int(done), "batches_per_epoch": int(per_epoch),
                "loader_batches": len(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, done = int(state.get("epoch", 0)), int(state.get("batches_done", 0))
        per_epoch = int(state.get("batches_per_epoch", len(self)))
        if int(state.get("loader_batches", len(self))) != len(self):
            raise InputError(
                f"the checkpoint's training epoch had {int(state['loader_batches'])} batches, "
                f"this data gives {len(self)}: resume with the same data, batch size and number "
                "of processes"
            )
        if 0 < done < per_epoch:  # stopped mid-epoch: continue it
            self.batch_sampler.set_epoch(epoch)
            self.batch_sampler.skip = done
        else:  # saved at the end of an epoch: the next one starts
            self.batch_sampler.set_epoch(epoch + (1 if done >= per_epoch else 0))
