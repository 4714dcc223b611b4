"""DynaMight's deformation decoder: ``delta_theta(z, c)`` for every consensus Gaussian (eq. 4).

Each Gaussian's consensus position ``c_j`` (box fractions) is positionally encoded, joined
with the particle's latent ``z`` and mapped by a point-wise MLP to a displacement; the decoder
returns ``delta`` and the caller forms ``c + delta`` (residual form). As in the reference
(``models/decoder.py:DisplacementDecoder``): ``L = 10`` sine/cosine frequencies per coordinate,
``f_i = (D/2)^(1 - i/(L-1))`` rad per box, from ``D/2`` down to 1; ``Linear(6L + zdim -> W)``
then ``n_layers x [Linear(W -> W) + ELU]``, ``Linear(W -> 3)``, ELU, ``Linear(3 -> 3)`` whose
weights start at zero (so ``delta = 0`` at the start); no biases. ``out_init_std > 0`` (a hetero
option) draws that last layer from ``N(0, out_init_std^2)`` instead, so that the data term gives
the encoder a gradient from the first step. The hidden layers keep PyTorch's default init (the
reference's), under which each ``W x W`` layer multiplies the activation variance by about 1/3:
through 8 layers the body's output starts ~300x smaller than its input, and so does ``z``'s
influence. ``hidden_init="unit"`` (a hetero option) draws them from ``N(0, 1/W)`` instead, which
keeps the variance through the layers.

The first layer is applied as ``W_c PE(c) + W_z z``: the ``(N, W)`` position part is computed
once per batch and broadcast against the ``(B, W)`` latent part, so the ``(B, N, 6L + zdim)``
input is never built. Memory is ``O(B N W)`` per layer. The decoder is a field: it can be
evaluated at any coordinates (used to compare the two half sets' deformations at the same
points, and by the inverse deformation of part 2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def positional_encoding(coords: Tensor, box_size: int, n_frequencies: int = 10) -> Tensor:
    """``(..., 3)`` box-fraction coordinates -> ``(..., 6 L)`` features
    ``[sin(f_i x_a), cos(f_i x_a)]`` with ``f_i = (D/2)^(1 - i/(L-1))`` (float32)."""
    x = coords.float()
    if n_frequencies == 1:
        freqs = torch.ones(1, device=x.device)
    else:
        i = torch.arange(n_frequencies, device=x.device, dtype=torch.float32)
        freqs = (box_size / 2.0) ** (1.0 - i / (n_frequencies - 1))
    arg = (x[..., None] * freqs).flatten(-2)  # (..., 3 L)
    return torch.cat([torch.sin(arg), torch.cos(arg)], -1)


class DeformationDecoder(nn.Module):
    """``z (B, zdim)``, ``coords (N, 3)`` box fractions -> displacements ``(B, N, 3)`` box fractions
    (in the autocast dtype under ``bf16-mixed``; callers add them to float32 positions).

    :param zdim: latent size. :param box_size: training box (sets the encoding frequencies).
    :param n_frequencies: ``L``. :param n_layers: hidden layers. :param width: their width.
    :param out_init_std: standard deviation of the last layer's initial weights (0: zeros, the
        reference's and paper's initialisation; the displacements then start exactly at 0).
    :param hidden_init: ``"reference"`` (PyTorch's default, as the reference) or ``"unit"``
        (hidden and ``W -> 3`` weights ``~ N(0, 1/fan_in)``: variance-preserving).
    :raises ValueError: ``out_init_std < 0`` or an unknown ``hidden_init``.
    """

    def __init__(
        self, zdim: int, box_size: int, n_frequencies: int = 10, n_layers: int = 8, width: int = 32,
        out_init_std: float = 0.0, hidden_init: str = "reference",
    ) -> None:
        super().__init__()
        self.box_size = int(box_size)
        self.n_frequencies = int(n_frequencies)
        self.coord_in = nn.Linear(6 * self.n_frequencies, width, bias=False)
        self.latent_in = nn.Linear(zdim, width, bias=False)
        blocks: list[nn.Module] = []
        for _ in range(int(n_layers)):
            blocks += [nn.Linear(width, width, bias=False), nn.ELU()]
        blocks += [nn.Linear(width, 3, bias=False), nn.ELU()]
        self.body = nn.Sequential(*blocks)
        if hidden_init not in ("reference", "unit"):
            raise ValueError(f"hidden_init must be 'reference' or 'unit', got {hidden_init!r}")
        if hidden_init == "unit":
            for layer in self.body:
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, 0.0, 1.0 / math.sqrt(layer.in_features))
        self.out = nn.Linear(3, 3, bias=False)
        if not math.isfinite(out_init_std) or out_init_std < 0:
            raise ValueError(f"out_init_std must be >= 0, got {out_init_std}")
        if out_init_std > 0:
            nn.init.normal_(self.out.weight, 0.0, float(out_init_std))
        else:
            nn.init.zeros_(self.out.weight)
        # The reference's init of the concatenated first layer: uniform(+-1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(6 * self.n_frequencies + zdim)
        nn.init.uniform_(self.coord_in.weight, -bound, bound)
        nn.init.uniform_(self.latent_in.weight, -bound, bound)

    def forward(self, z: Tensor, coords: Tensor) -> Tensor:
        """``coords`` ``(N, 3)`` shared by the batch or ``(B, N, 3)`` per particle."""
        h = self.coord_in(positional_encoding(coords, self.box_size, self.n_frequencies))
        if h.dim() == 2:
            h = h[None]
        h = h + self.latent_in(z)[:, None, :]
        return self.out(self.body(h))
