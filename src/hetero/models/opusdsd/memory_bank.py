"""The memory bank of per-particle latent codes used by the interclass disentanglement prior.

Buffers (all persistent, so they are in checkpoints): ``codes (N, Z)``, ``classes (N,)`` (last
seen projection class, -1 if never seen) and ``seen (N,)``. Updates use momentum
``codes[i] <- m * codes[i] + (1 - m) * mu_i`` (paper and reference: m = 0.7). The reference
starts from ``randn`` and always applies the momentum; by default here the first visit copies
``mu_i`` (``first_visit_copy``), and sampling draws only from entries seen at least once, so
the prior never compares codes with the random initialisation.

Under DDP the model gathers ``(index, mu, class)`` from all ranks before calling
:meth:`MemoryBank.update`, so every rank holds the same bank.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MemoryBank(nn.Module):
    """``N`` latent codes of size ``Z`` with momentum updates.

    :param n_particles: number of particles ``N`` (all particles, in input order).
    :param zdim: latent size ``Z``. :param momentum: weight of the old code (0.7).
    :param first_visit_copy: copy ``mu`` on a particle's first update instead of mixing it with
        the random initial code (reference: ``False``).
    """

    def __init__(self, n_particles: int, zdim: int, momentum: float = 0.7, first_visit_copy: bool = True) -> None:
        super().__init__()
        self.momentum = float(momentum)
        self.first_visit_copy = bool(first_visit_copy)
        self.register_buffer("codes", torch.randn(n_particles, zdim))
        self.register_buffer("classes", torch.full((n_particles,), -1, dtype=torch.long))
        self.register_buffer("seen", torch.zeros(n_particles, dtype=torch.bool))

    @torch.no_grad()
    def update(self, index: Tensor, mu: Tensor, classes: Tensor | None = None) -> None:
        """Momentum update of rows ``index (B,)`` with ``mu (B, Z)``.

        Duplicate indices (e.g. DDP padding) keep their first occurrence, so the result does not
        depend on scatter order and stays identical across ranks.
        """
        index = index.long().to(self.codes.device)
        mu = mu.detach().to(self.codes.device, self.codes.dtype)
        uniq, inverse = torch.unique(index, return_inverse=True)
        pos = torch.arange(index.shape[0], device=index.device)
        first = torch.full_like(uniq, index.shape[0]).scatter_reduce(0, inverse, pos, reduce="amin")
        idx, new = index[first], mu[first]
        old = self.codes[idx]
        mixed = self.momentum * old + (1.0 - self.momentum) * new
        if self.first_visit_copy:
            mixed = torch.where(self.seen[idx, None], mixed, new)
        self.codes[idx] = mixed
        self.seen[idx] = True
        if classes is not None:
            self.classes[idx] = classes.long().to(self.codes.device)[first]

    @torch.no_grad()
    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """Up to ``n`` codes (with their classes) drawn from seen entries: all of them when
        fewer than ``n`` are seen, otherwise uniformly with replacement."""
        seen = torch.nonzero(self.seen, as_tuple=True)[0]
        if seen.numel() > n:
            seen = seen[torch.randint(seen.numel(), (n,), device=seen.device)]
        return self.codes[seen], self.classes[seen]
