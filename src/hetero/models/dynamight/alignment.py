"""The common latent space of the two half sets.

The two VAEs are independent, so their latent spaces differ by an arbitrary transformation.
Validation particles are encoded by both encoders; the affine least-squares map from half-set-2
latents to half-set-1 latents of those particles (``latent_map``, refitted in every validation
loop and checkpointed) puts every particle's own-half latent into half set 1's coordinates,
where one decoder serves them all (``z_mu`` of the inference pass). ``R^2`` of the fit is
logged as ``val/latent_alignment_r2``: how well the two halves agree on the latent structure.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hetero.models.dynamight import distributed as dist


@torch.no_grad()
def accumulate_alignment(m, source: Tensor, target: Tensor) -> None:
    """Second moments of ``u = [z_half2, 1, z_half1]`` of validation particles."""
    u = torch.cat([source.float(), torch.ones_like(source[:, :1]).float(), target.float()], 1)
    m.align_stats += u.T @ u


def solve_alignment(m) -> float | None:
    """Least-squares affine map (ridge ``1e-6 n``) of half-2 onto half-1 latents of the
    validation particles -> ``latent_map``; returns R^2 (``None`` with too few particles)."""
    stats = dist.all_reduce_sum(m.align_stats.clone()).double()
    z = m.latent_map.shape[1]
    xtx, xty, yty = stats[: z + 1, : z + 1], stats[: z + 1, z + 1 :], stats[z + 1 :, z + 1 :]
    n = float(xtx[-1, -1])
    if n < z + 2:
        return None
    ridge = 1e-6 * n * torch.eye(z + 1, dtype=xtx.dtype, device=xtx.device)
    ridge[-1, -1] = 0.0
    sol = torch.linalg.solve(xtx + ridge, xty)
    m.latent_map.copy_(sol.float())
    sse = torch.trace(yty - 2 * sol.T @ xty + sol.T @ xtx @ sol)
    mean = xty[-1] / n
    sst = torch.trace(yty) - n * float((mean * mean).sum())
    return float(1.0 - sse / sst) if sst > 0 else None
