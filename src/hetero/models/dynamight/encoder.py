"""DynaMight's image encoder: a fully connected network on the masked, centred image.

Paper (Methods, "Estimation of conformational variability"): three linear layers with ReLU
activations mapping the real-space image to ``(mu, sigma)``. The reference
(``models/encoder.py:HetEncoder``) average-pools the image by 2, then
``Linear 256 -> ReLU -> Linear 128 -> Tanh -> {Linear mu, Linear log sigma^2}``; the activation
after the second layer is ``final_activation`` here (``relu``: paper, ``tanh``: reference).
The output is ``(mu, log sigma)`` as everywhere in hetero (the reference predicts
``log sigma^2``).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}


class HalfSetEncoder(nn.Module):
    """``(B, D, D)`` masked images -> ``mu, log sigma`` ``(B, zdim)``.

    :param box_size: image side ``D``. :param zdim: latent size.
    :param hidden: widths of the hidden layers (reference ``[256, 128]``).
    :param pool: average-pooling factor before the first layer (reference 2).
    :param final_activation: activation after the last hidden layer (``relu``/``tanh``/``elu``).
    :param logstd_init: initial bias of the ``log sigma`` head (``None``: PyTorch's default
        init, as the reference; e.g. ``-3``: ``sigma ~ 0.05`` at the start, so ``z ~ mu``).
    """

    def __init__(
        self,
        box_size: int,
        zdim: int,
        hidden: list[int] | tuple[int, ...] = (256, 128),
        pool: int = 2,
        final_activation: str = "relu",
        logstd_init: float | None = None,
    ) -> None:
        super().__init__()
        if final_activation not in ACTIVATIONS:
            raise ValueError(f"final_activation must be one of {sorted(ACTIVATIONS)}, got {final_activation!r}")
        self.pool = nn.AvgPool2d(pool) if pool > 1 else nn.Identity()
        n_in = (box_size // max(pool, 1)) ** 2
        layers: list[nn.Module] = []
        widths = [n_in, *[int(h) for h in hidden]]
        for i in range(len(widths) - 1):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            last = i == len(widths) - 2
            layers.append(ACTIVATIONS[final_activation]() if last else nn.ReLU())
        self.body = nn.Sequential(*layers)
        self.mu = nn.Linear(widths[-1], zdim)
        self.logstd = nn.Linear(widths[-1], zdim)
        if logstd_init is not None:
            if not math.isfinite(float(logstd_init)):
                raise ValueError(f"logstd_init must be finite or None, got {logstd_init}")
            nn.init.constant_(self.logstd.bias, float(logstd_init))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = self.pool(images[:, None])[:, 0].flatten(1)
        h = self.body(x)
        return self.mu(h), self.logstd(h)
