"""OPUS-DSD decoder: z -> ``T^3`` real-space template volume.

``Linear(z -> fc_width) + LeakyReLU -> Linear(-> channels[0]) + LeakyReLU`` reshaped to a
``channels[0] x 1^3`` seed, then one ``ConvTranspose3d`` (x2 upsampling, LeakyReLU 0.2) per
remaining entry of ``channels`` and a final ``ConvTranspose3d(-> 1)`` with no activation. The
first two upsampling layers use ``kernel 2, stride 2``, the rest ``kernel 4, stride 2,
padding 1`` (reference). Before the last ``resample_layers`` upsamplings the feature map is
resampled trilinearly to ``s = ceil(T / 2^resample_layers)`` (reference: 16^3 -> (16T/256)^3,
e.g. 12^3 for T = 192), so any template size works; when ``s * 2^resample_layers != T`` the
output is resampled to ``T`` at the end.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from hetero.models.opusdsd.encoder import init_leaky


class VolumeDecoder(nn.Module):
    """``(K, zdim) -> (K, T, T, T)``.

    :param zdim: latent size. :param template_size: output side ``T``.
    :param channels: seed channels followed by the widths of the upsampling layers
        (reference ``[2048, 1024, 512, 256, 128, 64, 32, 16]``).
    :param fc_width: hidden width of the first linear layer (reference 512).
    :param resample_layers: upsampling layers after the intermediate resampling (reference 4).
    :param output_gain: init gain of the output layer (reference 1/16).
    """

    def __init__(
        self,
        zdim: int,
        template_size: int,
        channels: tuple[int, ...] | list[int] = (2048, 1024, 512, 256, 128, 64, 32, 16),
        fc_width: int = 512,
        resample_layers: int = 4,
        output_gain: float = 1.0 / 16,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels:
            raise ValueError("decoder needs at least the seed channel count")
        self.template_size = int(template_size)
        self.seed_channels = channels[0]
        self.fc = nn.Sequential(
            nn.Linear(zdim, fc_width), nn.LeakyReLU(0.2), nn.Linear(fc_width, channels[0]), nn.LeakyReLU(0.2)
        )
        widths = [*channels, 1]
        layers = []
        for i in range(1, len(widths)):
            conv = (
                nn.ConvTranspose3d(widths[i - 1], widths[i], 2, 2)
                if i <= 2
                else nn.ConvTranspose3d(widths[i - 1], widths[i], 4, 2, 1)
            )
            last = i == len(widths) - 1
            layers.append(conv if last else nn.Sequential(conv, nn.LeakyReLU(0.2)))
        self.ups = nn.ModuleList(layers)
        n_up = len(layers)
        self.n_after = min(int(resample_layers), n_up)
        self.resample_at = n_up - self.n_after
        self.mid_size = max(1, math.ceil(self.template_size / 2**self.n_after))
        self.out_size = self.mid_size * 2**self.n_after
        init_leaky(self)
        out_conv = layers[-1]
        out_conv.weight.data.mul_(output_gain / nn.init.calculate_gain("leaky_relu", 0.2))

    def forward(self, z: Tensor) -> Tensor:
        x = self.fc(z).reshape(z.shape[0], self.seed_channels, 1, 1, 1)
        for i, layer in enumerate(self.ups):
            if i == self.resample_at and x.shape[-1] != self.mid_size:
                x = F.interpolate(x, size=(self.mid_size,) * 3, mode="trilinear", align_corners=False)
            x = layer(x)
        if self.out_size != self.template_size:
            x = F.interpolate(x, size=(self.template_size,) * 3, mode="trilinear", align_corners=False)
        return x[:, 0]
