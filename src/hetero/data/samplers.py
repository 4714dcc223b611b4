"""Rank-aware batch samplers: HEALPix projection-class batches, random batches, sequential shards.

All samplers yield *lists of dataset positions* (``0 .. n-1`` of the dataset they are used
with) and are meant for ``DataLoader(dataset, batch_sampler=...)`` with Lightning's
``use_distributed_sampler=False``: they shard across DDP ranks themselves.

Epoch samplers (:class:`HealpixBatchSampler`, :class:`RandomBatchSampler`)
--------------------------------------------------------------------------
Per epoch the *global* list of batches is built identically on every rank from
``(seed, epoch)`` and then dealt round-robin to the ranks (batch ``j`` goes to rank
``j % num_replicas``). Consequences:

* With ``drop_last=False`` every particle is used exactly once per epoch across all ranks,
  except for *padding*: when the number of global batches is not a multiple of
  ``num_replicas``, the list is padded by repeating batches from its start so that every rank
  gets the **same number of batches** (at most ``num_replicas - 1`` batches, i.e. a few
  particles, are seen twice in that epoch). Without padding the ranks would run different
  numbers of steps and DDP would hang in the gradient all-reduce of the extra step.
* With ``drop_last=True`` incomplete batches are dropped (per class for the HEALPix sampler)
  and the global list is truncated to a multiple of ``num_replicas``: no particle is repeated
  and all batches are full, but a few particles are skipped that epoch (different ones every
  epoch, because the shuffle changes).
* Batches dealt to different ranks are disjoint (apart from the padding above).
* ``set_epoch(epoch)`` changes the shuffle. Lightning calls ``set_epoch`` only on
  ``dataloader.sampler`` and ``dataloader.batch_sampler.sampler``, so these samplers expose a
  ``sampler`` attribute that forwards ``set_epoch`` to them: the epoch is set automatically
  by the fit loop, also when resuming.

Example usage::

    sampler = HealpixBatchSampler(dataset.pose_classes, batch_size=64,
                                  num_replicas=world_size, rank=rank, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=4)
    for epoch in range(n_epochs):
        sampler.set_epoch(epoch)          # Lightning does this for you
        for batch in loader: ...
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

__all__ = ["HealpixBatchSampler", "RandomBatchSampler", "SequentialShardBatchSampler"]


def _check_rank(num_replicas: int, rank: int) -> None:
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")


class _EpochHook:
    """What Lightning's fit loop finds as ``batch_sampler.sampler``: forwards ``set_epoch``."""

    def __init__(self, owner: _EpochBatchSampler) -> None:
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)


class _EpochBatchSampler(Sampler[list[int]]):
    """Shared logic: per-class shuffled chunks, a global shuffle of batches, round-robin dealing.

    :param labels: ``(n,)`` integer label of each dataset position; batches never mix labels.
    """

    def __init__(
        self,
        labels: np.ndarray,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        _check_rank(num_replicas, rank)
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
        # Dense class ids 0..C-1 (any integer labels are accepted).
        _, self._codes = np.unique(labels, return_inverse=True)
        self._codes = self._codes.astype(np.int64).reshape(-1)
        self._counts = np.bincount(self._codes) if len(labels) else np.zeros(0, np.int64)
        self.n = len(labels)
        self.batch_size = int(batch_size)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.sampler = _EpochHook(self)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of epoch ``epoch`` (call before iterating; Lightning does)."""
        self.epoch = int(epoch)

    @property
    def n_global_batches(self) -> int:
        """Number of batches per epoch over all ranks before padding/truncation."""
        if self.drop_last:
            return int(np.sum(self._counts // self.batch_size))
        return int(np.sum(-(-self._counts // self.batch_size)))

    def __len__(self) -> int:
        """Exact number of batches this rank yields per epoch (the same on every rank)."""
        g = self.n_global_batches
        if self.drop_last:
            return g // self.num_replicas
        return math.ceil(g / self.num_replicas)

    def global_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """The epoch's batches over all ranks, in global order, before dealing (int64 arrays)."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch])
        if self.n == 0:
            return []
        # Shuffle all positions, then stable-sort by class: grouped by class, shuffled within.
        perm = rng.permutation(self.n)
        order = perm[np.argsort(self._codes[perm], kind="stable")]
        ends = np.cumsum(self._counts)
        starts = ends - self._counts
        batches: list[np.ndarray] = []
        bs = self.batch_size
        for start, count in zip(starts.tolist(), self._counts.tolist()):
            stop = start + (count // bs) * bs if self.drop_last else start + count
            for b in range(start, stop, bs):
                batches.append(order[b : min(b + bs, stop)])
        # Classes drawn at random: a uniform shuffle of the batch order.
        return [batches[i] for i in rng.permutation(len(batches))]

    def rank_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """The batches this rank yields in epoch ``epoch`` (default: the current epoch)."""
        batches = self.global_batches(epoch)
        g = len(batches)
        if g == 0:
            return []
        r = self.num_replicas
        if self.drop_last:
            batches = batches[: (g // r) * r]
        else:
            total = math.ceil(g / r) * r
            batches = batches + [batches[i % g] for i in range(total - g)]
        return batches[self.rank :: r]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.rank_batches():
            yield batch.tolist()


class HealpixBatchSampler(_EpochBatchSampler):
    """Batches of particles from ONE HEALPix projection class each (OPUS-DSD style).

    Every epoch: particles are shuffled within each class (seeded by ``(seed, epoch)``), each
    class is cut into batches of ``batch_size`` (its last batch may be smaller unless
    ``drop_last``), and the batches of all classes are shuffled together, so the class of each
    successive batch is drawn at random (proportionally to the number of batches it has left).
    The global batch list is dealt to the ranks as described in :mod:`hetero.data.samplers`
    (equal batch counts per rank; padding repeats a few batches when ``drop_last=False``).

    :param pose_classes: ``(n,)`` integer class of each dataset position (e.g.
        :attr:`hetero.data.dataset.ParticleDataset.pose_classes`).
    :param batch_size: particles per batch on each rank (the per-GPU batch size).
    :param num_replicas: number of DDP ranks (world size).
    :param rank: this process' global rank.
    :param seed: base seed; the epoch's shuffle is seeded by ``(seed, epoch)``.
    :param drop_last: drop each class' incomplete last batch and truncate to a multiple of
        ``num_replicas`` instead of padding.
    """

    def __init__(
        self,
        pose_classes: np.ndarray,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(pose_classes, batch_size, num_replicas, rank, seed, drop_last)

    @property
    def n_classes(self) -> int:
        """Number of distinct (non-empty) classes."""
        return len(self._counts)


class RandomBatchSampler(_EpochBatchSampler):
    """Shuffled batches of ``n`` positions, rank-aware, with :class:`HealpixBatchSampler`'s
    guarantees (exactly-once coverage up to padding, equal batch counts per rank, seeded by
    ``(seed, epoch)``); only the last global batch may be smaller (``drop_last=False``).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(np.zeros(int(n), np.int64), batch_size, num_replicas, rank, seed, drop_last)


class SequentialShardBatchSampler(Sampler[list[int]]):
    """Contiguous, unshuffled batches for validation and prediction; one disjoint shard per rank.

    Positions ``0 .. n-1`` are split into ``num_replicas`` contiguous shards whose sizes differ
    by at most one (rank 0 gets the first shard). Every rank yields the **same number of
    batches** ``k = ceil(ceil(n / num_replicas) / batch_size)``: each shard is cut into ``k``
    contiguous batches of nearly equal size (at most ``batch_size``, differing by at most one),
    so no particle is repeated and no rank waits for another in collective calls. Uneven tails:
    when ``n`` is not a multiple of ``num_replicas`` the last ranks have one particle fewer; when
    a shard is shorter than ``k`` (only if ``n < num_replicas * k``, e.g. ``n < num_replicas``)
    that rank yields fewer batches. With ``num_replicas=1`` and ``n`` a multiple of
    ``batch_size`` the batches are exactly ``[0..bs-1], [bs..2bs-1], ...``.

    Concatenating the batches of ranks ``0, 1, ...`` in order gives ``0 .. n-1``.
    """

    def __init__(self, n: int, batch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        _check_rank(num_replicas, rank)
        self.n = int(n)
        self.batch_size = int(batch_size)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        sizes = np.full(self.num_replicas, self.n // self.num_replicas)
        sizes[: self.n % self.num_replicas] += 1
        self.shard_start = int(np.sum(sizes[: self.rank]))
        self.shard_size = int(sizes[self.rank])
        self._k = math.ceil(int(sizes.max()) / self.batch_size) if self.n else 0

    def _bounds(self) -> np.ndarray:
        k = min(self._k, self.shard_size)
        if k == 0:
            return np.zeros(1, np.int64)
        base, extra = divmod(self.shard_size, k)
        lengths = np.full(k, base)
        lengths[:extra] += 1
        return np.concatenate([[0], np.cumsum(lengths)]) + self.shard_start

    def __len__(self) -> int:
        return len(self._bounds()) - 1

    def __iter__(self) -> Iterator[list[int]]:
        bounds = self._bounds()
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            yield list(range(a, b))
