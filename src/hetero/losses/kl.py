"""KL divergence of the diagonal-Gaussian posterior from N(0, I) (beta-VAE term of eq. 9)."""

from __future__ import annotations

from torch import Tensor, nn


def gaussian_kl(mu: Tensor, logstd: Tensor) -> Tensor:
    """``KL(N(mu, sigma^2) || N(0, I))`` per sample, summed over latent dimensions, float32.

    ``logstd`` is ``log sigma``. ``(B, Z), (B, Z) -> (B,)``; zero for ``mu = 0, logstd = 0``.
    """
    mu, logstd = mu.float(), logstd.float()
    return (-logstd + 0.5 * (mu * mu + (2 * logstd).exp()) - 0.5).sum(-1)


class KLDivergence(nn.Module):
    """beta-KL term. The model's effective weight is ``weight * SNR * beta(schedule)``.

    :param weight: the paper's ``lambda_KL = 2 x SNR`` gives ``weight = 2`` with
        ``snr_scaled=True`` (the reference code uses ``beta_control * snr`` with
        ``beta_control`` 0.5-1).
    :param snr_scaled: multiply by the running SNR estimate (paper and reference).
    """

    def __init__(self, weight: float = 2.0, snr_scaled: bool = True) -> None:
        super().__init__()
        self.weight = float(weight)
        self.snr_scaled = bool(snr_scaled)

    def effective_weight(self, snr: float, beta: float) -> float:
        """``weight * (snr if snr_scaled) * beta``."""
        return self.weight * (snr if self.snr_scaled else 1.0) * beta

    def forward(self, mu: Tensor, logstd: Tensor) -> Tensor:
        """Unweighted batch-mean KL (nats per image)."""
        return gaussian_kl(mu, logstd).mean()
