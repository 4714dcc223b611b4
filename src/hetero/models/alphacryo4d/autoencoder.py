"""The 3D deep residual autoencoder of AlphaCryo4D (network only; training in ``module``).

Architecture of the reference code (``DeepFeature/run_resnet.py``; 1,709 parameters with the
defaults), channels-first, "same" padding, ``CBR`` = Conv3d -> BatchNorm -> ReLU:

============ ================================== ==================
block        operation                          output (C, size)
============ ================================== ==================
conv1        CBR 1->c1, k5, stride ``first``    c1, D/first
rb2.1, rb2.2 RB(c1->c1, s2), RB(c1->c1, s1)     c1, D/2first
rb3.1, rb3.2 RB(c1->c2, s2), RB(c2->c2, s1)     c2, D/4first
encoded      RB(c2->c2, s1): the feature map     c2, D/4first
trb5.1, 5.2  TRB(c2->c2, s2), TRB(c2->c2, s1)   c2, D/2first
trb6.1, 6.2  TRB(c2->c1, s2), TRB(c1->c1, s1)   c1, D/first
tconv7       ConvT c1->1, k5, stride ``first``, BN, sigmoid   1, D
============ ================================== ==================

``RB(s)`` (paper eq. 3): main branch CBR(k3, stride s) -> CBR(k3, s1); shortcut the identity
when shapes match, else a 1x1x1 convolution with stride ``s`` (no BN, no activation); output
= shortcut + main, no activation after the sum. ``TRB`` is the same with transposed
convolutions (stride 2 doubles the size). Defaults ``c1 = 2, c2 = 1, first = 1`` are the
code's; the paper's Table 1 lists stride 2 for conv1 (``first_stride=2``: feature map D/8).

BatchNorm uses Keras' defaults (momentum 0.99, i.e. PyTorch ``momentum=0.01``, eps 1e-3);
weights are Glorot-uniform and biases zero, as Keras initialises them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_BN = {"momentum": 0.01, "eps": 1e-3}


def _conv(c_in: int, c_out: int, k: int, stride: int, transposed: bool) -> nn.Module:
    pad = k // 2
    if transposed:
        return nn.ConvTranspose3d(c_in, c_out, k, stride, pad, output_padding=stride - 1)
    return nn.Conv3d(c_in, c_out, k, stride, pad)


class _CBR(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, k: int, stride: int, transposed: bool) -> None:
        super().__init__(
            _conv(c_in, c_out, k, stride, transposed), nn.BatchNorm3d(c_out, **_BN), nn.ReLU()
        )


class ResidualBlock3d(nn.Module):
    """``RB`` (``transposed=False``) or ``TRB`` (``transposed=True``); see module docstring.

    Input ``(B, c_in, S, S, S)`` -> ``(B, c_out, S', S', S')`` with ``S' = S / stride``
    (``S * stride`` when transposed).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, transposed: bool = False) -> None:
        super().__init__()
        self.main = nn.Sequential(
            _CBR(c_in, c_out, 3, stride, transposed), _CBR(c_out, c_out, 3, 1, transposed)
        )
        self.shortcut = (
            nn.Identity()
            if c_in == c_out and stride == 1
            else _conv(c_in, c_out, 1, stride, transposed)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x) + self.main(x)


class ResidualAutoencoder3d(nn.Module):
    """Encoder/decoder of volumes ``(B, 1, D, D, D)`` in ``[0, 1]``.

    :param channels: ``(c1, c2)`` widths (reference ``(2, 1)``).
    :param first_stride: stride of conv1 and of the final transposed convolution
        (reference code 1, paper Table 1 2). ``D`` must be divisible by ``4 * first_stride``.
    """

    def __init__(self, channels: tuple[int, int] = (2, 1), first_stride: int = 1) -> None:
        super().__init__()
        c1, c2 = (int(c) for c in channels)
        s = int(first_stride)
        if s not in (1, 2):
            raise ValueError(f"first_stride must be 1 or 2, got {first_stride}")
        self.first_stride = s
        self.encoder = nn.Sequential(
            _CBR(1, c1, 5, s, transposed=False),
            ResidualBlock3d(c1, c1, 2),
            ResidualBlock3d(c1, c1, 1),
            ResidualBlock3d(c1, c2, 2),
            ResidualBlock3d(c2, c2, 1),
            ResidualBlock3d(c2, c2, 1),  # "encoded": the feature map
        )
        self.decoder = nn.Sequential(
            ResidualBlock3d(c2, c2, 2, transposed=True),
            ResidualBlock3d(c2, c2, 1, transposed=True),
            ResidualBlock3d(c2, c1, 2, transposed=True),
            ResidualBlock3d(c1, c1, 1, transposed=True),
            _conv(c1, 1, 5, s, transposed=True),
            nn.BatchNorm3d(1, **_BN),
            nn.Sigmoid(),
        )
        self.reset_parameters()

    @property
    def downsampling(self) -> int:
        """Side of the input divided by the side of the feature map."""
        return 4 * self.first_stride

    def reset_parameters(self) -> None:
        """Keras initialisation: Glorot-uniform kernels, zero biases, BN gamma 1 beta 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d | nn.ConvTranspose3d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm3d):
                m.reset_parameters()

    def encode(self, x: Tensor) -> Tensor:
        """``(B, 1, D, D, D)`` -> feature maps ``(B, c2, D/k, D/k, D/k)``, ``k`` =
        :attr:`downsampling`."""
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))

    def kernel_l2(self) -> Tensor:
        """Sum of squared convolution kernels and biases (Keras ``l2`` regularisers)."""
        total = torch.zeros((), device=next(self.parameters()).device)
        for m in self.modules():
            if isinstance(m, nn.Conv3d | nn.ConvTranspose3d):
                total = total + m.weight.float().pow(2).sum() + m.bias.float().pow(2).sum()
        return total
