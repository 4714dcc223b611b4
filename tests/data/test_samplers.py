"""Batch samplers: one class per batch, exactly-once coverage, equal per-rank lengths, seeding."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from hetero.data.samplers import (
    HealpixBatchSampler,
    RandomBatchSampler,
    SequentialShardBatchSampler,
)


def _classes(n: int = 503, n_classes: int = 48, seed: int = 0) -> np.ndarray:
    # Uneven class sizes, some empty classes, some tiny ones.
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(n_classes, 0.5))
    return rng.choice(n_classes, size=n, p=p)


def _epoch(make, num_replicas: int, epoch: int = 0) -> list[list[list[int]]]:
    per_rank = []
    for rank in range(num_replicas):
        s = make(num_replicas, rank)
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s)
        per_rank.append(batches)
    return per_rank


@pytest.mark.parametrize("num_replicas", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_healpix_one_class_per_batch_and_exact_coverage(num_replicas, batch_size):
    classes = _classes()
    n = len(classes)

    def make(r, k):
        return HealpixBatchSampler(classes, batch_size, num_replicas=r, rank=k, seed=3)

    per_rank = _epoch(make, num_replicas)
    lengths = {len(b) for b in per_rank}
    assert len(lengths) == 1, "every rank must get the same number of batches"
    for batches in per_rank:
        for b in batches:
            assert 1 <= len(b) <= batch_size
            assert len(set(classes[b].tolist())) == 1

    counts = Counter(i for batches in per_rank for b in batches for i in b)
    assert set(counts) == set(range(n)), "every particle used in the epoch"
    # Exactly once, except the padding batches (repeats of the first global batches).
    sampler = make(num_replicas, 0)
    g = sampler.n_global_batches
    n_pad = math.ceil(g / num_replicas) * num_replicas - g
    assert n_pad < num_replicas
    globals_ = sampler.global_batches(0)
    padded = Counter(i for b in globals_[:n_pad] for i in b.tolist())
    for i, c in counts.items():
        assert c == 1 + padded.get(i, 0)
    # Global batches per class: ceil(count / batch_size).
    expected = sum(math.ceil(c / batch_size) for c in np.bincount(classes) if c)
    assert g == expected


@pytest.mark.parametrize("num_replicas", [1, 2, 3])
def test_ranks_disjoint_without_padding(num_replicas):
    classes = _classes(n=600)

    def make(r, k):
        return HealpixBatchSampler(classes, 8, num_replicas=r, rank=k, seed=1)

    per_rank = _epoch(make, num_replicas)
    g = make(num_replicas, 0).n_global_batches
    n_pad = math.ceil(g / num_replicas) * num_replicas - g
    # The last batch of the last n_pad ranks is padding; everything else is disjoint.
    sets = []
    for rank, batches in enumerate(per_rank):
        real = batches[:-1] if rank >= num_replicas - n_pad else batches
        sets.append({i for b in real for i in b})
    for a in range(num_replicas):
        for b in range(a + 1, num_replicas):
            assert not sets[a] & sets[b]


@pytest.mark.parametrize("num_replicas", [1, 2, 3])
def test_drop_last_full_batches_no_repeats(num_replicas):
    classes = _classes()

    def make(r, k):
        return HealpixBatchSampler(classes, 16, num_replicas=r, rank=k, seed=0, drop_last=True)

    per_rank = _epoch(make, num_replicas)
    assert len({len(b) for b in per_rank}) == 1
    flat = [i for batches in per_rank for b in batches for i in b]
    assert len(flat) == len(set(flat))
    assert all(len(b) == 16 for batches in per_rank for b in batches)


def test_set_epoch_changes_order_and_seed_is_deterministic():
    classes = _classes()
    a = HealpixBatchSampler(classes, 16, seed=5)
    b = HealpixBatchSampler(classes, 16, seed=5)
    c = HealpixBatchSampler(classes, 16, seed=6)
    assert list(a) == list(b)
    assert list(a) != list(c)
    e0 = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) != e0
    assert list(a) == list(b)
    a.set_epoch(0)
    assert list(a) == e0
    # Lightning calls set_epoch on batch_sampler.sampler: it must reach the batch sampler.
    a.sampler.set_epoch(4)
    assert a.epoch == 4


def test_classes_drawn_at_random():
    # The class sequence is shuffled, not class-by-class.
    classes = np.repeat(np.arange(10), 50)
    s = HealpixBatchSampler(classes, 10, seed=0)
    seq = [int(classes[b[0]]) for b in s]
    assert seq != sorted(seq)
    assert Counter(seq) == {c: 5 for c in range(10)}


@pytest.mark.parametrize("num_replicas", [1, 2, 3])
@pytest.mark.parametrize("n", [0, 1, 5, 100, 257])
def test_random_sampler_coverage(num_replicas, n):
    def make(r, k):
        return RandomBatchSampler(n, 16, num_replicas=r, rank=k, seed=0)

    per_rank = _epoch(make, num_replicas)
    assert len({len(b) for b in per_rank}) == 1
    counts = Counter(i for batches in per_rank for b in batches for i in b)
    assert set(counts) == set(range(n))
    if n % 16 == 0 and (n // 16) % num_replicas == 0:
        assert all(c == 1 for c in counts.values())
    s = make(1, 0)
    s.set_epoch(1)
    if n > 16:
        assert list(s) != list(make(1, 0))


@pytest.mark.parametrize("num_replicas", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 3, 64, 100, 257])
def test_sequential_shards(num_replicas, n):
    shards = [list(SequentialShardBatchSampler(n, 32, num_replicas, r)) for r in range(num_replicas)]
    flat = [i for batches in shards for b in batches for i in b]
    assert flat == list(range(n)), "contiguous, in order, disjoint, complete"
    for r, batches in enumerate(shards):
        assert len(batches) == len(SequentialShardBatchSampler(n, 32, num_replicas, r))
        assert all(0 < len(b) <= 32 for b in batches)
    if n >= num_replicas * math.ceil(math.ceil(n / num_replicas) / 32):
        assert len({len(b) for b in shards}) == 1, "equal batch counts per rank"
    if num_replicas == 1 and n == 64:
        assert shards[0] == [list(range(32)), list(range(32, 64))]


def test_invalid_arguments():
    with pytest.raises(ValueError):
        RandomBatchSampler(10, 0)
    with pytest.raises(ValueError):
        RandomBatchSampler(10, 4, num_replicas=2, rank=2)
    with pytest.raises(ValueError):
        SequentialShardBatchSampler(10, 4, num_replicas=0)
