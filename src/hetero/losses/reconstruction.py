"""Multi-pose reconstruction loss of OPUS-DSD (paper eq. 9, first term).

For image ``X`` and model images ``Y_p = F(g(z), theta'_p, u)`` at ``P`` poses around the
consensus pose, the per-image negative log-likelihood is::

    nll = -log sum_p exp(-||X - Y_p||^2 / (2 sigma^2))

(paper eq. 9 with ``sigma^2 = 1``; the sum runs over scored pixels). Its gradient is the
pose-posterior-weighted residual, i.e. the reference code's EM form
``sum_p stopgrad(softmax_p) * e_p`` has the same gradient.

Scaling: the data module normalises images to unit standard deviation, so at low SNR the
per-pixel noise variance is close to 1 and ``sigma^2 = 1`` (``noise_model="unit"``) is the
paper's objective. ``noise_model="running"`` instead divides by the running per-pixel residual
variance estimated by :class:`hetero.losses.snr.RunningSNR` (a proper Gaussian likelihood for
un-normalised data). In both cases the returned value is ``mean_b(nll) / n_pix`` (per scored
pixel, so ~0.5 at a perfect fit with ``sigma^2`` equal to the noise variance); the model divides
every other per-image term (KL, prior, TV, L1) by the same ``n_pix``, which keeps the relative
weights of eq. 9 while making the total O(1).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn


def squared_errors(predicted: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """``||X - Y_p||^2`` over (masked) pixels, float32.

    :param predicted: ``(B, P, D, D)`` model images. :param target: ``(B, D, D)``.
    :param mask: optional ``(D, D)`` pixel weights.
    :return: ``(B, P)``.
    """
    diff = predicted.float() - target.float().unsqueeze(1)
    sq = diff * diff
    if mask is not None:
        sq = sq * mask.float()
    return sq.sum((-2, -1))


def multi_pose_nll(sq_errors: Tensor, noise_var: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """``-log sum_p exp(-e_p / (2 sigma^2))`` per image and the (detached) pose posterior.

    :param sq_errors: ``(B, P)`` squared errors. :param noise_var: ``sigma^2`` (scalar).
    :return: ``nll (B,)`` and ``weights (B, P)`` (softmax over poses, no gradient).
    """
    logits = -0.5 * sq_errors.float() / noise_var
    nll = -torch.logsumexp(logits, dim=1)
    return nll, torch.softmax(logits.detach(), dim=1)


class MultiPoseReconstructionLoss(nn.Module):
    """Paper eq. 9 reconstruction term over the consensus and neighbouring poses.

    :param weight: multiplier of the term in the total loss (1 in the paper).
    :param noise_model: ``"unit"`` (``sigma^2 = 1``, the paper, for normalised data) or
        ``"running"`` (``sigma^2`` = running residual variance per pixel).
    """

    def __init__(self, weight: float = 1.0, noise_model: Literal["unit", "running"] = "unit") -> None:
        super().__init__()
        if noise_model not in ("unit", "running"):
            raise ValueError(f"noise_model must be 'unit' or 'running', got {noise_model!r}")
        self.weight = float(weight)
        self.noise_model = noise_model

    def forward(
        self,
        predicted: Tensor,
        target: Tensor,
        mask: Tensor | None = None,
        noise_var: Tensor | float = 1.0,
    ) -> dict[str, Tensor]:
        """Unweighted per-pixel loss and by-products.

        :param predicted: ``(B, P, D, D)``. :param target: ``(B, D, D)``.
        :param mask: optional ``(D, D)`` scored-pixel weights. :param noise_var: running
            ``sigma^2`` (used only with ``noise_model="running"``).
        :return: ``{"loss": scalar, "nll": (B,), "sq_errors": (B, P), "weights": (B, P),
            "n_pix": scalar}``.
        """
        sq = squared_errors(predicted, target, mask)
        var = noise_var if self.noise_model == "running" else 1.0
        nll, weights = multi_pose_nll(sq, var)
        n_pix = (
            mask.float().sum() if mask is not None else torch.tensor(float(target.shape[-1] ** 2))
        ).to(sq.device)
        return {"loss": nll.mean() / n_pix, "nll": nll, "sq_errors": sq, "weights": weights, "n_pix": n_pix}
