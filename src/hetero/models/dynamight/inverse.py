"""Inverse deformations of DynaMight (paper: "Improved 3D reconstruction"; notes section 6).

A particle's forward deformation maps consensus points to deformed points,
``Gamma(x) = x + d(x, z)`` (the decoder ``d`` of :mod:`.decoder`, a field defined everywhere).
Its inverse ``Gamma^-1(y)`` is the consensus point that moves to ``y``. The paper learns it with
a second MLP trained on the pairs ``(Gamma(c_j), c_j)`` (``Gamma^-1(Gamma(c_j)) = c_j`` on the
Gaussians); here the exact alternative needs no training:

**Fixed-point iteration** (``model.inverse=iterative``): ``x = Gamma^-1(y)`` solves
``x = y - d(x)``; iterate ``x_{k+1} = y - d(x_k)`` from ``x_0 = y - d(y)``. It is a contraction,
and converges geometrically to the unique inverse, wherever the field's Lipschitz constant
``L = sup ||grad d|| < 1`` (error ``<= L^k / (1 - L) ||x_1 - x_0||``): deformations that do not
fold space. Iteration stops when every point moved less than ``tol`` or after ``max_iter``
steps; the residual ``||Gamma(x) - y||`` is returned so that callers can see points where it
did not converge (folding fields).

The inverse-consistency error ``||Gamma(Gamma^-1(y)) - y||`` (:func:`inverse_consistency`) is
the measure of any inverse (iterative or learned) on points of the deformed frame; on the
consensus, ``||Gamma^-1(Gamma(c)) - c||`` measures it on the Gaussians.

All functions are pure tensor functions; units are whatever the field uses (Å in the analysis
step). ``field`` is a callable ``(B, M, 3) -> (B, M, 3)`` displacements (per-particle latents
bound in, e.g. :func:`half_set_field`).

Example usage::

    field = half_set_field(model.halves[0], z)           # (B, M, 3) Å -> (B, M, 3) Å
    x, residual = iterative_inverse(field, y)            # y (B, M, 3) Å in the deformed frame
    err = inverse_consistency(field, lambda y: iterative_inverse(field, y)[0], y)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Field = Callable[[Tensor], Tensor]


def iterative_inverse(
    field: Field, y: Tensor, max_iter: int = 50, tol: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """``Gamma^-1(y)`` by the fixed-point iteration ``x <- y - d(x)`` (module docstring).

    :param field: displacement field ``d``, ``(B, M, 3) -> (B, M, 3)``.
    :param y: ``(B, M, 3)`` points in the deformed frame (units of the field).
    :param max_iter: most iterations. :param tol: stop when no point moves more than this.
    :return: ``x (B, M, 3)`` and the residual ``||x + d(x) - y|| (B, M)``.
    :raises ValueError: ``y`` not ``(..., 3)``.
    """
    if y.shape[-1] != 3:
        raise ValueError(f"points must be (..., 3), got {tuple(y.shape)}")
    x = y - field(y)
    for _ in range(int(max_iter)):
        new = y - field(x)
        step = (new - x).norm(dim=-1).max()
        x = new
        if float(step) < tol:
            break
    residual = (x + field(x) - y).norm(dim=-1)
    return x, residual


def inverse_consistency(field: Field, inverse: Callable[[Tensor], Tensor], y: Tensor) -> Tensor:
    """``||Gamma(Gamma^-1(y)) - y||`` per point ``(B, M)`` for an inverse ``(B, M, 3) -> (B, M, 3)``."""
    x = inverse(y)
    return (x + field(x) - y).norm(dim=-1)


def consensus_consistency(field: Field, inverse: Callable[[Tensor], Tensor], c: Tensor) -> Tensor:
    """``||Gamma^-1(Gamma(c)) - c||`` per point ``(B, M)`` at consensus points ``c (B, M, 3)``."""
    return (inverse(c + field(c)) - c).norm(dim=-1)


def half_set_field(vae, z: Tensor) -> Field:
    """The displacement field in Å of one half set's decoder for latents ``z (B, zdim)``:
    ``(B, M, 3)`` Å (from the box centre) -> ``(B, M, 3)`` Å (float32)."""
    extent = float(vae.consensus.extent_angstrom)
    z = z.float()

    def field(points: Tensor) -> Tensor:
        coords = points.float() / extent
        if coords.dim() == 2:
            coords = coords.expand(z.shape[0], -1, -1)
        return vae.displacements(z, coords) * extent

    return field


def grid_points(box_size: int, apix: float, step_px: int = 1, device=None) -> Tensor:
    """``(M, 3)`` (x, y, z) Å from the box centre of every ``step_px``-th voxel of a ``D^3`` grid
    (voxel ``i`` at ``(i - D // 2) * apix``)."""
    axis = (torch.arange(0, box_size, step_px, device=device, dtype=torch.float32) - box_size // 2) * apix
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
    return torch.stack([xx, yy, zz], -1).reshape(-1, 3)


__all__ = [
    "consensus_consistency",
    "grid_points",
    "half_set_field",
    "inverse_consistency",
    "iterative_inverse",
]
