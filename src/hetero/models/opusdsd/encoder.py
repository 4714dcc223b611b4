"""OPUS-DSD encoder: image -> canonical-frame pseudo-volume -> 3-D conv stack -> q(z | X).

Spatial transformer. The image ``I`` of a particle at pose ``A`` is the projection of
``V'(r) = V(A.T r)`` along z (:mod:`hetero.physics.conventions`). Extruding ``I`` along z gives
``E(x, y, z) = I(x, y)``, the backprojection in the image frame; mapping it back to the volume
frame samples it at ``A r``: ``W(r) = E(A r) = I((A r)_x, (A r)_y)``. Because ``E`` does not
depend on z, sampling ``E`` trilinearly equals sampling ``I`` bilinearly at the first two
coordinates of ``A r`` (inside the inscribed sphere, where the mask keeps values, the z bound
of the extruded box is never reached), so :meth:`ImageEncoder.backproject` does one batched
2-D ``grid_sample`` over the ``C^3`` grid instead of building and rotating ``C^3`` volumes. It
is non-trainable and runs in float32.

Conv stack: ``Conv3d(k=4, s=2, p=1) + LeakyReLU(0.2)`` per entry of ``channels``, no norm
layers. With more than three layers the tensor is resampled trilinearly to
``resample_size^3`` (reference 12) before the last three, which take it to ``1^3``, so any
cube ``C`` works; with three or fewer layers the final ``s^3`` feature map is flattened.
Then ``Linear(-> fc_width) + LeakyReLU`` and two heads for ``mu`` and ``log sigma``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hetero.physics.masks import spherical_mask
from hetero.physics.projection import centered_grid_3d


def _conv_out(size: int) -> int:
    return (size + 2 - 4) // 2 + 1


def init_leaky(module: nn.Module, slope: float = 0.2) -> None:
    """Xavier-uniform weights with the LeakyReLU gain and zero biases (reference init)."""
    gain = nn.init.calculate_gain("leaky_relu", slope)
    for m in module.modules():
        if isinstance(m, nn.Conv3d | nn.ConvTranspose3d | nn.Linear):
            nn.init.xavier_uniform_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ImageEncoder(nn.Module):
    """``(B, C, C)`` images + ``(B, 3, 3)`` poses -> ``mu, log sigma`` ``(B, zdim)``.

    :param size: encoder cube side ``C`` (images must already be ``C x C``).
    :param zdim: latent size. :param channels: output channels of the conv layers.
    :param fc_width: hidden width of the fully connected layer.
    :param resample_size: cube side before the last three conv layers (when there are more).
    :param mask_radius: radius of the spherical mask as a fraction of ``C / 2``.
    """

    def __init__(
        self,
        size: int,
        zdim: int = 8,
        channels: tuple[int, ...] | list[int] = (32, 64, 128, 256, 512, 1024),
        fc_width: int = 512,
        resample_size: int = 12,
        mask_radius: float = 1.0,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels:
            raise ValueError("encoder needs at least one conv layer")
        self.size, self.zdim = int(size), int(zdim)
        self.register_buffer("grid", centered_grid_3d(self.size).reshape(-1, 3), persistent=False)
        self.register_buffer(
            "mask", spherical_mask(self.size, radius_px=mask_radius * self.size / 2), persistent=False
        )
        n_tail = 3 if len(channels) > 3 else len(channels)
        self.n_head_layers = len(channels) - n_tail
        self.resample_size = int(resample_size) if self.n_head_layers > 0 else None
        layers, c_in, s = [], 1, self.size
        for i, c in enumerate(channels):
            if i == self.n_head_layers and self.resample_size:
                s = self.resample_size
            s = _conv_out(s)
            if s < 1:
                raise ValueError(
                    f"encoder cube {self.size} too small for {len(channels)} stride-2 layers"
                )
            layers.append(nn.Sequential(nn.Conv3d(c_in, c, 4, 2, 1), nn.LeakyReLU(0.2)))
            c_in = c
        self.convs = nn.ModuleList(layers)
        self.flat = c_in * s**3
        self.fc = nn.Sequential(nn.Linear(self.flat, fc_width), nn.LeakyReLU(0.2))
        self.mu = nn.Linear(fc_width, zdim)
        self.logstd = nn.Linear(fc_width, zdim)
        init_leaky(self)
        nn.init.xavier_uniform_(self.mu.weight)
        nn.init.xavier_uniform_(self.logstd.weight, gain=0.1)

    def backproject(self, images: Tensor, rotations: Tensor) -> Tensor:
        """Extrude ``(B, C, C)`` images along z and rotate them into the volume frame:
        ``W(r) = I((A r)_xy)``, masked by the sphere. Float32 ``(B, C, C, C)`` ``[z, y, x]``."""
        b, c = images.shape[0], self.size
        with torch.autocast(images.device.type, enabled=False):
            rot = rotations.float()
            # Row-vector form of A r: r^T A^T; only x and y are needed.
            xy = torch.einsum("ni,bji->bnj", self.grid, rot[:, :2])
            xy = (xy + c // 2) * (2.0 / (c - 1)) - 1.0
            # Lay the C^3 sample points out as a (C, C^2) "image" ([z, y*x]): grid_sample's CPU
            # kernel is an order of magnitude faster with a long last axis than with W = 1.
            out = F.grid_sample(
                images.float()[:, None], xy.reshape(b, c, c * c, 2), mode="bilinear",
                padding_mode="zeros", align_corners=True,
            )
            return out.reshape(b, c, c, c) * self.mask

    def features(self, volumes: Tensor) -> Tensor:
        """Conv stack + FC on ``(B, C, C, C)`` pseudo-volumes -> ``(B, fc_width)``."""
        x = volumes[:, None]
        for i, layer in enumerate(self.convs):
            if i == self.n_head_layers and self.resample_size and x.shape[-1] != self.resample_size:
                x = F.interpolate(x, size=(self.resample_size,) * 3, mode="trilinear", align_corners=False)
            x = layer(x)
        return self.fc(x.flatten(1))

    def forward(self, images: Tensor, rotations: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(self.backproject(images, rotations))
        return self.mu(h), self.logstd(h)
