"""Stage 1 of AlphaCryo4D: M-fold particle shuffling into overlapping unions.

The particles are permuted with a seeded generator, optionally split into batches
(sub-datasets, paper section 4.1), and each batch into ``n_subsets`` groups of (almost) equal
size. Union ``i`` of a batch holds the ``window`` consecutive groups ``i, i+1, ...`` (cyclic).

- Leave-one-group-out (paper, reference ``resample.py``): ``n_subsets = M + 1``,
  ``window = M``; union ``i`` is every group but one, and every particle is in exactly ``M``
  unions.
- Generalised bootstrap (the co-author fork's ``bootstrap.py``): any ``n_subsets`` and odd
  ``window``; every particle is in exactly ``window`` unions.

Unlike the reference (``floor(N/n)`` batches, remainders written to ``_extra`` files that are
never processed), no particle is dropped: batch and group sizes differ by at most one.

Example usage::

    shuffle = leave_one_out(n_particles=100_000, fold=3, seed=0)
    shuffle.unions[0]            # sorted particle indices of union 0
    shuffle.votes_per_particle   # 3
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Shuffle:
    """Particle unions for volume resampling.

    :param unions: list of ``U`` sorted int64 arrays of particle indices.
    :param union_batch: ``(U,)`` batch (sub-dataset) of each union.
    :param group: ``(N,)`` group of each particle within its batch.
    :param batch: ``(N,)`` batch of each particle.
    :param n_subsets: groups per batch; ``window``: groups per union.
    :param seed: the permutation seed.
    """

    unions: list[np.ndarray]
    union_batch: np.ndarray
    group: np.ndarray
    batch: np.ndarray
    n_subsets: int
    window: int
    seed: int

    @property
    def n_particles(self) -> int:
        return len(self.group)

    @property
    def n_unions(self) -> int:
        return len(self.unions)

    @property
    def votes_per_particle(self) -> int:
        """``M``: unions holding each particle (the voting threshold is ``floor(M/2)+1``)."""
        return self.window

    def membership_counts(self) -> np.ndarray:
        """``(N,)`` how many unions hold each particle (all equal to ``window``)."""
        return np.bincount(np.concatenate(self.unions), minlength=self.n_particles)

    def union_names(self) -> list[str]:
        """``u{union}_b{batch}`` names, as the reference names its volumes."""
        per_batch = self.n_subsets
        return [f"u{i % per_batch + 1}_b{int(b) + 1}" for i, b in enumerate(self.union_batch)]


def shuffle_unions(
    n_particles: int,
    n_subsets: int,
    window: int,
    seed: int = 0,
    batch_size: int | None = None,
) -> Shuffle:
    """Cyclic-window unions of seeded random groups (see module docstring).

    :param n_particles: ``N``.
    :param n_subsets: groups per batch (``M + 1`` for leave-one-out).
    :param window: consecutive groups per union (``M`` for leave-one-out), ``1 <= window <
        n_subsets``.
    :param seed: seed of the permutation (same seed, same unions).
    :param batch_size: split into ``ceil(N / batch_size)`` batches of equal size first
        (the paper's sub-datasets for millions of particles); ``None`` = one batch.
    :raises ValueError: inconsistent sizes (e.g. fewer particles than groups).
    """
    n_particles, n_subsets, window = int(n_particles), int(n_subsets), int(window)
    if not 1 <= window < n_subsets:
        raise ValueError(f"shuffling: need 1 <= window ({window}) < n_subsets ({n_subsets})")
    n_batches = 1 if not batch_size else max(1, -(-n_particles // int(batch_size)))
    if n_particles < n_batches * n_subsets:
        raise ValueError(
            f"shuffling: {n_particles} particles cannot fill {n_batches} batch(es) of "
            f"{n_subsets} groups"
        )
    order = np.random.default_rng(seed).permutation(n_particles)
    group = np.empty(n_particles, dtype=np.int64)
    batch = np.empty(n_particles, dtype=np.int64)
    unions: list[np.ndarray] = []
    union_batch: list[int] = []
    for b, members in enumerate(np.array_split(order, n_batches)):
        groups = np.array_split(members, n_subsets)
        for g, idx in enumerate(groups):
            group[idx] = g
            batch[idx] = b
        for i in range(n_subsets):
            chosen = [groups[(i + j) % n_subsets] for j in range(window)]
            unions.append(np.sort(np.concatenate(chosen)))
            union_batch.append(b)
    return Shuffle(unions, np.asarray(union_batch, np.int64), group, batch, n_subsets, window, int(seed))


def leave_one_out(n_particles: int, fold: int = 3, seed: int = 0, batch_size: int | None = None) -> Shuffle:
    """The paper's M-fold shuffling: ``M + 1`` groups, each union leaves one out.

    Union ``i`` omits group ``(i - 1) mod (M + 1)``.
    """
    if int(fold) < 1:
        raise ValueError(f"shuffling: fold M must be >= 1, got {fold}")
    return shuffle_unions(n_particles, int(fold) + 1, int(fold), seed, batch_size)
