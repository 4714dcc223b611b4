"""OPUS-DSD's structural disentanglement prior (paper eqs. 5-7).

With ``d_ij = ||mu_i - mu_j||^2`` (squared Euclidean distance between posterior means), the
prior for image ``i`` of projection class ``P_i`` is::

    intraclass (eq. 5):  1/K1 sum_{j in kNN(i), P_j = P_i}  log(1 + d_ij)          attraction
                       + 1/N1 sum_{j != i,    P_j = P_i}    log(1 + 1/(d_ij + eps)) repulsion
    interclass (eq. 6):  1/K2 sum_{j in kNN(i), P_j != P_i} log(1 + d_ij)          attraction
                       + 1/N2 sum_{j in kFP(i), P_j != P_i} log(1 + 1/(d_ij + eps)) repulsion

The intraclass terms use the other images of the batch (the HEALPix batch sampler makes a
batch one projection class; here classes are compared per image, so any batch works). The
interclass terms use codes sampled from the memory bank (no gradient through them). Terms are
averaged over the batch; images without partners contribute 0.

Paper vs reference code (options): the reference weights the intraclass repulsion by
``stopgrad(min(d_ij, 1))`` (``repulsion_weighting="reference"``) and multiplies the interclass
repulsion by 3 (``inter_repulsion_weight=3``); the paper has neither (defaults). K2 and N2
(128 and 512 of 12,800 samples in the paper) are scaled down in proportion when fewer bank
codes are available (the reference uses ``k = min(128, n/4)``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """``(n, Z), (m, Z) -> (n, m)`` squared Euclidean distances, float32, clamped at 0."""
    a, b = a.float(), b.float()
    d = (a * a).sum(-1, keepdim=True) - 2 * a @ b.T + (b * b).sum(-1)[None]
    return d.clamp(min=0)


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Row means of ``values`` over ``valid`` entries (0 for rows without any)."""
    v = torch.where(valid, values, torch.zeros_like(values))
    return v.sum(-1) / valid.sum(-1).clamp(min=1)


def _attraction(d: Tensor) -> Tensor:
    return torch.log1p(d)


def _repulsion(d: Tensor, eps: float, weighting: str) -> Tensor:
    r = torch.log1p(1.0 / (d + eps))
    if weighting == "reference":
        r = r * d.detach().clamp(max=1.0)
    return r


def intraclass_prior(
    mu: Tensor,
    classes: Tensor,
    k: int = 4,
    eps: float = 1e-3,
    repulsion_weighting: str = "paper",
) -> tuple[Tensor, Tensor]:
    """Eq. 5 within a batch: ``(attraction, repulsion)`` per image, each ``(B,)``.

    :param mu: ``(B, Z)`` posterior means. :param classes: ``(B,)`` projection classes.
    :param k: ``K1``, nearest same-class neighbours attracted.
    """
    n = mu.shape[0]
    d = squared_distances(mu, mu)
    same = (classes[:, None] == classes[None, :]) & ~torch.eye(n, dtype=torch.bool, device=mu.device)
    repel = _masked_mean(_repulsion(d, eps, repulsion_weighting), same)
    k_eff = int(min(k, int(same.sum(1).max().item()) if n > 1 else 0))
    if k_eff == 0:
        return torch.zeros(n, device=mu.device), repel
    near_d, near_idx = torch.where(same, d, torch.full_like(d, math.inf)).topk(k_eff, dim=1, largest=False)
    valid = torch.isfinite(near_d)
    attract = _masked_mean(_attraction(torch.where(valid, near_d, torch.zeros_like(near_d))), valid)
    return attract, repel


def interclass_prior(
    mu: Tensor,
    classes: Tensor,
    bank_codes: Tensor,
    bank_classes: Tensor,
    k: int = 128,
    n_far: int = 512,
    reference_size: int = 12_800,
    eps: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """Eq. 6 against bank samples: ``(attraction, repulsion)`` per image, each ``(B,)``.

    :param mu: ``(B, Z)``. :param classes: ``(B,)``.
    :param bank_codes: ``(M, Z)`` sampled bank codes (detached here).
    :param bank_classes: ``(M,)`` their projection classes.
    :param k: ``K2`` nearest neighbours. :param n_far: ``N2`` farthest points.
    :param reference_size: number of samples ``k`` and ``n_far`` refer to; with fewer valid
        (other-class) samples both are scaled down proportionally (at least 1).
    """
    b = mu.shape[0]
    zero = torch.zeros(b, device=mu.device)
    if bank_codes.shape[0] == 0:
        return zero, zero
    d = squared_distances(mu, bank_codes.detach())
    other = classes[:, None] != bank_classes[None, :]
    n_valid = int(other.sum(1).min().item())
    if n_valid == 0:
        return zero, zero
    scale = min(1.0, n_valid / float(reference_size))
    k_eff = max(1, min(n_valid, int(k * scale)))
    far_eff = max(1, min(n_valid, int(n_far * scale)))
    near_d = torch.where(other, d, torch.full_like(d, math.inf)).topk(k_eff, dim=1, largest=False)[0]
    far_d = torch.where(other, d, torch.full_like(d, -math.inf)).topk(far_eff, dim=1, largest=True)[0]
    return _attraction(near_d).mean(1), _repulsion(far_d, eps, "paper").mean(1)


class StructuralDisentanglementPrior(nn.Module):
    """The prior ``J`` of eq. 7 with its weight rules.

    Effective weight (see :meth:`effective_weight`):
    ``weight * (1 - exp(-(snr / snr_gate)^2)) * (beta + anneal_floor) / (1 + anneal_floor)``.
    The paper sets ``lambda`` by the dataset's SNR (2 spliceosome/Pf80S, 1 Sc80S, 0.5 NEXT and
    synthetic) and anneals it with the cyclical schedule; the SNR gate and the annealing floor
    are the reference code's formulas (``snr_gate=null`` and ``anneal_floor=0`` disable them).

    :param weight: ``lambda``. :param k_intra: ``K1`` (paper 4). :param k_inter: ``K2`` (128).
    :param n_far: ``N2`` (512). :param n_samples: bank codes drawn per step (12,800).
    :param eps: added to distances in the repulsion. :param repulsion_weighting: ``"paper"`` or
        ``"reference"`` (see module docstring). :param inter_repulsion_weight: factor on the
        interclass repulsion (paper 1, reference 3).
    :param snr_gate: SNR scale of the gate, or ``None``. :param anneal_floor: see above.
    """

    def __init__(
        self,
        weight: float = 0.5,
        k_intra: int = 4,
        k_inter: int = 128,
        n_far: int = 512,
        n_samples: int = 12_800,
        eps: float = 1e-3,
        repulsion_weighting: Literal["paper", "reference"] = "paper",
        inter_repulsion_weight: float = 1.0,
        snr_gate: float | None = 0.01,
        anneal_floor: float = 0.05,
    ) -> None:
        super().__init__()
        if repulsion_weighting not in ("paper", "reference"):
            raise ValueError(f"repulsion_weighting must be 'paper' or 'reference', got {repulsion_weighting!r}")
        self.weight = float(weight)
        self.k_intra, self.k_inter, self.n_far = int(k_intra), int(k_inter), int(n_far)
        self.n_samples = int(n_samples)
        self.eps = float(eps)
        self.repulsion_weighting = repulsion_weighting
        self.inter_repulsion_weight = float(inter_repulsion_weight)
        self.snr_gate = None if snr_gate is None else float(snr_gate)
        self.anneal_floor = float(anneal_floor)

    def effective_weight(self, snr: float, beta: float) -> float:
        gate = 1.0 if not self.snr_gate else 1.0 - math.exp(-((snr / self.snr_gate) ** 2))
        anneal = (beta + self.anneal_floor) / (1.0 + self.anneal_floor)
        return self.weight * gate * anneal

    def forward(
        self,
        mu: Tensor,
        classes: Tensor,
        bank_codes: Tensor | None = None,
        bank_classes: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Unweighted components (batch means) and their sum under ``"total"``."""
        intra_a, intra_r = intraclass_prior(mu, classes, self.k_intra, self.eps, self.repulsion_weighting)
        out = {"intra_attraction": intra_a.mean(), "intra_repulsion": intra_r.mean()}
        if bank_codes is not None and bank_classes is not None:
            inter_a, inter_r = interclass_prior(
                mu, classes, bank_codes, bank_classes, self.k_inter, self.n_far, self.n_samples, self.eps
            )
            out["inter_attraction"] = inter_a.mean()
            out["inter_repulsion"] = self.inter_repulsion_weight * inter_r.mean()
        out["total"] = sum(out.values())
        return out
