"""Sufficient statistics of one EM iteration, summed over batches and over DDP ranks.

The posterior- and CTF-weighted backprojections of every class of every replicate (``U * K``
classes, replicate-major, each as two half-set grids for its FSC; plus one consensus per
replicate in the first iteration) are two stacked tensors in the data model of :class:`~hetero.physics.reconstruction.BackprojectionAccumulator`
(:mod:`.backprojection` fills them, :meth:`IterationStatistics.accumulator` hands one class to
the accumulator's own reconstruction); small tensors hold the per-replicate sums of the other
updates (class weights, residual power per shell, particle counts, log-likelihood, ``Pmax``,
changed assignments, and in the first iteration the power and mean of the image spectra for
the initial noise estimate). Everything is a sum, so an all-reduce over ranks gives each rank
the statistics of the whole data set and ``trainer.devices=N`` makes the same maps as one
device (up to summation order).

Memory: ``2 U K`` grids of ``(pad * D)^3`` complex + real voxels (12 bytes each in float32):
50 MB per class for ``D = 64``, ``pad = 2``.

Example usage::

    stats = IterationStatistics(U, K, box, n_shells, pad_factor=2, device=dev)
    data = insertion_data(stats.template, images, rotations, shifts, ctf, r_max)
    stats.backproject(data, weights, pair_particle, pair_replicate, half_set)
    stats.all_reduce()                     # no-op without torch.distributed
    vol = stats.accumulator(c).reconstruct()      # both halves; stats.half(c, 0) one of them
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import Tensor

from hetero.models.class3d.backprojection import InsertionData, scatter
from hetero.physics.reconstruction import BackprojectionAccumulator

#: Per-replicate sums and their trailing shape: ``K`` classes, ``shells``, or a scalar;
#: ``views``: posterior-weighted sums of the 6 entries of ``d d^T`` of the projection
#: directions per class (``K6``), ``views_all`` the same over all particles (:mod:`.diagnostics`).
SCALARS = {
    "class_weight": "K",
    "residual": "shells",
    "count": "",
    "loglik": "",
    "nll_per_pixel": "",
    "pmax": "",
    "changes": "",
    "changes_scored": "",
    "power": "shells",
    "views": "K6",
    "views_all": "6",
}


class IterationStatistics:
    """The sums an EM iteration needs (see the module docstring).

    :param n_replicates, n_classes: ``U``, ``K``.
    :param box_size: map side ``D``. :param n_shells: ``D // 2 + 1``.
    :param pad_factor: oversampling of the Fourier grids.
    :param consensus: also keep one consensus grid per replicate (first iteration).
    :param n_mean_points: length of the per-replicate sum of image spectra (first iteration;
        0 = none).
    :param dtype: float32 or float64 grids.
    """

    def __init__(
        self,
        n_replicates: int,
        n_classes: int,
        box_size: int,
        n_shells: int,
        pad_factor: int = 2,
        device=None,
        consensus: bool = False,
        n_mean_points: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        u, k = int(n_replicates), int(n_classes)
        self.n_replicates, self.n_classes = u, k
        #: an empty accumulator: the geometry (``ctf_size``, ``padded_size``) and reconstruction
        self.template = BackprojectionAccumulator(box_size, pad_factor, device=device, dtype=dtype)
        grid = self.template.weight.shape

        def grids(n: int) -> tuple[Tensor, Tensor]:
            return (torch.zeros(n, *grid, dtype=self.template.numerator.dtype, device=device),
                    torch.zeros(n, *grid, dtype=dtype, device=device))

        self.numerator, self.weight = grids(2 * u * k)              # grid 2 c + h: class c, half h
        self.consensus_numerator, self.consensus_weight = grids(2 * u if consensus else 0)
        sizes = {"K": (k,), "shells": (n_shells,), "": (), "K6": (k, 6), "6": (6,)}
        self.sums = {
            name: torch.zeros((u, *sizes[kind]), dtype=torch.float64, device=device)
            for name, kind in SCALARS.items()
        }
        self.mean_spectrum = (
            torch.zeros(u, n_mean_points, dtype=torch.complex128, device=device) if n_mean_points else None
        )

    @property
    def ctf_size(self) -> int:
        """Grid on which the backprojection expects the CTF (the accumulator's ``ctf_size``)."""
        return self.template.ctf_size

    def half(self, c: int, h: int, consensus: bool = False) -> BackprojectionAccumulator:
        """Half set ``h`` of class ``c`` (``u * K + k``) or of replicate ``c``'s consensus (views)."""
        acc = copy.copy(self.template)
        acc.numerator = (self.consensus_numerator if consensus else self.numerator)[2 * c + h]
        acc.weight = (self.consensus_weight if consensus else self.weight)[2 * c + h]
        return acc

    def accumulator(self, c: int, consensus: bool = False) -> BackprojectionAccumulator:
        """Class ``c`` or replicate ``c``'s consensus, both halves summed (new tensors)."""
        acc = copy.copy(self.template)
        h0, h1 = self.half(c, 0, consensus), self.half(c, 1, consensus)
        acc.numerator = h0.numerator + h1.numerator
        acc.weight = h0.weight + h1.weight
        return acc

    def add(self, name: str, replicate: Tensor, values: Tensor) -> None:
        """``sums[name][replicate[p]] += values[p]`` for every row ``p``."""
        self.sums[name].index_add_(0, replicate, values.to(torch.float64))

    def backproject(
        self, data: InsertionData, weights: Tensor, pair_particle: Tensor, pair_replicate: Tensor,
        half_set: Tensor, into_consensus: bool = False,
    ) -> None:
        """Insert each (particle, replicate) pair into its classes with weight ``g``.

        :param weights: ``(P, K)`` posteriors (zeros are skipped), or ``(P,)`` for the
            consensus grids (``into_consensus``).
        :param half_set: ``(B,)`` half set (0/1) of each particle of the batch.
        """
        half = half_set.long()
        if into_consensus:
            scatter(data, self.consensus_numerator, self.consensus_weight, pair_particle,
                    2 * pair_replicate + half[pair_particle], weights)
            return
        rows, kk = torch.nonzero(weights > 0, as_tuple=True)
        part = pair_particle[rows]
        scatter(data, self.numerator, self.weight, part,
                2 * (pair_replicate[rows] * self.n_classes + kk) + half[part], weights[rows, kk])

    def all_reduce(self) -> None:
        """Sum every statistic over the ranks of the default process group (if any)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        flat = torch.cat([t.flatten() for t in self.sums.values()])
        dist.all_reduce(flat)
        pos = 0
        for t in self.sums.values():
            t.copy_(flat[pos : pos + t.numel()].view_as(t))
            pos += t.numel()
        if self.mean_spectrum is not None:
            dist.all_reduce(torch.view_as_real(self.mean_spectrum))
        for t in (self.numerator, self.consensus_numerator):
            if t.numel():
                dist.all_reduce(torch.view_as_real(t))
        for t in (self.weight, self.consensus_weight):
            if t.numel():
                dist.all_reduce(t)


def check_each_particle_once(seen: Tensor, sampler: str = "?") -> None:
    """EM sums must count every particle once: refuse an epoch that repeated some (a sampler
    padding DDP shards, e.g. data/sampler=random with trainer.devices > 1).

    :param seen: ``(N,)`` int32 times each particle was read by this rank (summed over ranks here).
    :raises RuntimeError: naming the sampler and what to use instead.
    """
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(seen)
    if bool((seen > 1).any()):
        raise RuntimeError(
            f"class3d: {int((seen > 1).sum())} particles were read more than once in one epoch "
            f"(data.sampler={sampler} pads DDP shards by repeating batches), which would count them "
            "twice in the EM sums: use data/sampler=sequential (the default of model=class3d)"
        )


def merged_assignments(new: Tensor, old: Tensor) -> Tensor:
    """The best class of every (particle, replicate) after an E-step: ``new`` (``-1`` where this
    rank did not see the pair; maximum over ranks) where set, else ``old``."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(new, op=dist.ReduceOp.MAX)
    return torch.where(new >= 0, new, old)
