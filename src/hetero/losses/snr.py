"""Running signal-to-noise estimate that scales OPUS-DSD's regulariser weights.

Per batch, with pose-posterior weights ``w_p`` over the rendered poses::

    signal   = mean_b sum_p w_p ||Y_p||^2          (power of the model images)
    residual = mean_b sum_p w_p ||Y_p - X||^2      (power of what the model does not explain)
    snr     <- snr + rate * (signal / residual - snr)
    noise   <- noise + rate * (residual / n_pix - noise)     (per-pixel residual variance)

as in the reference code (EMA rate 0.01). Both statistics live in buffers, so they are saved in
checkpoints; the model averages the batch statistics over DDP ranks before :meth:`update`, so
the estimate is identical on every rank. The reference resets ``snr`` to its initial value at
every epoch; here that is optional (``reset``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def batch_power(predicted: Tensor, target: Tensor, weights: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(signal, residual)`` batch means of posterior-weighted powers (float32 scalars).

    :param predicted: ``(B, P, D, D)``. :param target: ``(B, D, D)``. :param weights: ``(B, P)``.
    :param mask: optional ``(D, D)`` scored-pixel weights.
    """
    pred = predicted.detach().float()
    diff = pred - target.detach().float().unsqueeze(1)
    sig, res = pred * pred, diff * diff
    if mask is not None:
        sig, res = sig * mask, res * mask
    w = weights.detach().float()
    return (w * sig.sum((-2, -1))).sum(1).mean(), (w * res.sum((-2, -1))).sum(1).mean()


class RunningSNR(nn.Module):
    """Exponential moving averages of the SNR and the per-pixel noise variance.

    :param initial: starting SNR (reference: 0.01).
    :param rate: EMA rate per update (reference: 0.01).
    :param initial_noise_var: starting per-pixel noise variance (1 for normalised images).
    """

    def __init__(self, initial: float = 0.01, rate: float = 0.01, initial_noise_var: float = 1.0) -> None:
        super().__init__()
        self.initial, self.rate, self.initial_noise_var = float(initial), float(rate), float(initial_noise_var)
        self.register_buffer("snr", torch.tensor(self.initial))
        self.register_buffer("noise_var", torch.tensor(self.initial_noise_var))

    @torch.no_grad()
    def update(self, signal: Tensor, residual: Tensor, n_pix: Tensor | float) -> None:
        """One EMA step from batch powers (already averaged over ranks)."""
        residual = residual.float().clamp(min=1e-12)
        ratio = signal.float() / residual
        if torch.isfinite(ratio):
            self.snr.add_(self.rate * (ratio - self.snr))
            self.noise_var.add_(self.rate * (residual / n_pix - self.noise_var))

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the initial SNR (the reference does this every epoch)."""
        self.snr.fill_(self.initial)

    def forward(self) -> Tensor:
        return self.snr
