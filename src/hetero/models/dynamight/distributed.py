"""Collectives that keep both half sets' state identical on every DDP rank.

DynaMight's model does not use DDP's gradient hooks (its parameters take part in a step or not
depending on the training phase and on which half sets a rank's batch holds, which DDP's
reducer cannot express): gradients are summed explicitly with :func:`sum_gradients`, and every
statistic that updates a buffer (losses per half, residual spectra, pooled particles, gradient
norms) is all-reduced before use, so all ranks apply identical updates. All functions are
no-ops in a single process.
"""

from __future__ import annotations

import torch
from torch import Tensor


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """In-place sum over ranks (returns the tensor)."""
    if world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """In-place broadcast from ``src`` (returns the tensor)."""
    if world_size() > 1:
        torch.distributed.broadcast(tensor, src)
    return tensor


def gather_rows(tensor: Tensor) -> Tensor:
    """Concatenate ``(n_r, ...)`` tensors of equal shape over ranks -> ``(sum n_r, ...)``."""
    if world_size() <= 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(world_size())]
    torch.distributed.all_gather(out, tensor.contiguous())
    return torch.cat(out)


def sum_gradients(parameters: list[Tensor]) -> None:
    """Sum ``.grad`` of ``parameters`` over ranks (a missing gradient counts as zero and is
    created, so every rank ends with the same set of gradients)."""
    if world_size() <= 1:
        return
    grads = []
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n
