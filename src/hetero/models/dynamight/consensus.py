"""The consensus model of one half set: ``N`` Gaussian pseudo-atoms (DynaMight eq. 2).

Parameters (all optimised; unlike the reference, whose amplitudes sit in no optimiser):

- ``positions``: ``(N, 3)`` centres ``(x, y, z)`` in *box fractions* of the training box
  (``[-0.5, 0.5)``, origin at the box centre), the reference's unit, so its learning rates carry
  over; :meth:`GaussianConsensus.positions_angstrom` gives Å.
- ``log_sigma``: ``(N,)`` log standard deviations in training-box pixels (the paper's ``s_j``
  per Gaussian; ``(1,)`` with ``shared_width``, the reference's single width class), clamped to ``[min_width_px, max_width_px]`` when used, which also bounds the
  renderer's stencil.
- ``log_amplitude``: ``(N,)`` log peak heights (voxel-value units of the training-box maps).

Initialisation (:meth:`seed` then :meth:`fit`, reference ``initialize_points_from_volume`` and
``initialize_physical_parameters``): positions drawn uniformly inside the voxels above a
threshold (default the map's 99th percentile), equal widths and amplitudes; then stage 1 fits
the global amplitude scale (the least-squares optimum, which the reference approaches with 50
Adam steps at lr 0.1), stage 2 runs Adam on positions, widths and amplitudes (reference: 50
steps at lr 1e-4), both on the voxel MSE between the rasterised Gaussians and the map.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hetero.physics.gaussians import rasterize_gaussians


class GaussianConsensus(nn.Module):
    """``N`` Gaussians in a training box of ``box_size`` pixels of ``apix`` Å.

    :param n_gaussians: ``N``. :param box_size: training box ``D``. :param apix: its pixel size.
    :param initial_width_px: starting ``sigma`` (pixels); ``None``: the reference's ``D / 40``
        kernel parameter, ``sigma = D / (40 * 2 sqrt 2)``, but at least ``min_width_px``.
    :param min_width_px, max_width_px: clamp of ``sigma`` (pixels).
    :param shared_width: one width for all Gaussians (the reference's default of one width
        class) instead of one per Gaussian (the paper's ``s_j``).
    """

    def __init__(
        self,
        n_gaussians: int,
        box_size: int,
        apix: float,
        initial_width_px: float | None = None,
        min_width_px: float = 0.75,
        max_width_px: float = 4.0,
        shared_width: bool = False,
    ) -> None:
        super().__init__()
        self.n_gaussians = int(n_gaussians)
        self.box_size = int(box_size)
        self.apix = float(apix)
        self.min_width_px = float(min_width_px)
        self.max_width_px = float(max_width_px)
        if not 0 < self.min_width_px <= self.max_width_px:
            raise ValueError(f"need 0 < min_width_px <= max_width_px, got {min_width_px}, {max_width_px}")
        width = initial_width_px or self.box_size / (40 * 2 * math.sqrt(2))
        width = min(max(float(width), self.min_width_px), self.max_width_px)
        n = self.n_gaussians
        self.positions = nn.Parameter(torch.zeros(n, 3))
        self.shared_width = bool(shared_width)
        self.log_sigma = nn.Parameter(torch.full((1 if self.shared_width else n,), math.log(width)))
        self.log_amplitude = nn.Parameter(torch.zeros(n))

    @property
    def extent_angstrom(self) -> float:
        """Side of the training box in Å (``D * apix``): box fractions -> Å."""
        return self.box_size * self.apix

    def positions_angstrom(self, positions: Tensor | None = None) -> Tensor:
        """Centres in Å (of ``positions`` in box fractions, default the consensus)."""
        p = self.positions if positions is None else positions
        return p.float() * self.extent_angstrom

    def sigma_px(self) -> Tensor:
        """``(N,)`` widths in training-box pixels (clamped)."""
        sigma = self.log_sigma.float().exp().clamp(self.min_width_px, self.max_width_px)
        return sigma.expand(self.n_gaussians)

    def sigma_angstrom(self) -> Tensor:
        return self.sigma_px() * self.apix

    def amplitudes(self) -> Tensor:
        """``(N,)`` peak heights (positive)."""
        return self.log_amplitude.float().exp()

    def rasterize(self, grid_size: int, positions: Tensor | None = None) -> Tensor:
        """Maps of the (deformed) Gaussians on a ``grid_size``-cube spanning the training box.

        :param positions: ``(N, 3)`` or ``(K, N, 3)`` box fractions (default the consensus).
        :return: ``(T, T, T)`` or ``(K, T, T, T)`` in training-box voxel-value units.
        """
        voxel = self.extent_angstrom / grid_size
        return rasterize_gaussians(
            self.positions_angstrom(positions), self.sigma_angstrom(), self.amplitudes(), grid_size, voxel
        )

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def seed(self, volume: Tensor, threshold: float | None = None, quantile: float = 0.99,
             generator: torch.Generator | None = None, sampling: str = "random") -> float:
        """Place the Gaussians inside the voxels of ``volume`` (a ``(D, D, D)`` map on the
        training grid) above ``threshold`` (default: the ``quantile`` of the map), each at a
        uniform random point of its voxel. ``sampling="random"``: voxels drawn with replacement
        (the reference's rejection sampling; some voxels get none, ~e^(-N/M) of M); ``"stratified"``
        (hetero option): every voxel gets ``N // M`` Gaussians and ``N mod M`` voxels drawn without
        replacement one more. Returns the threshold used.

        :raises ValueError: no voxel is above the threshold, or an unknown ``sampling``.
        """
        vol = volume.detach().float().cpu()
        if threshold is None:
            flat = vol.flatten()
            sample = flat[torch.randperm(flat.numel(), generator=generator)[: 1 << 22]]
            threshold = float(torch.quantile(sample, quantile))
        above = torch.nonzero(vol > threshold)  # (M, 3) as (z, y, x)
        if len(above) == 0:
            raise ValueError(
                f"no voxel of the consensus map is above the seeding threshold {threshold:.4g} "
                f"(map range {float(vol.min()):.4g} .. {float(vol.max()):.4g}); lower "
                "model.initial_threshold"
            )
        n, m = self.n_gaussians, len(above)
        if sampling == "random":
            pick = torch.randint(m, (n,), generator=generator)
        elif sampling == "stratified":
            pick = torch.cat([torch.arange(m).repeat(n // m), torch.randperm(m, generator=generator)[: n % m]])
        else:
            raise ValueError(f"sampling must be 'random' or 'stratified', got {sampling!r}")
        jitter = torch.rand(n, 3, generator=generator) - 0.5
        zyx = above[pick].float() + jitter - vol.shape[-1] // 2
        xyz_px = zyx.flip(-1)
        self.positions.copy_((xyz_px / vol.shape[-1]).to(self.positions))
        return float(threshold)

    def fit(self, volume: Tensor, steps: int = 50, lr: float = 1e-4) -> dict[str, float]:
        """Stage 1 (global amplitude scale, least squares) and stage 2 (``steps`` Adam steps at
        ``lr`` on positions, widths and amplitudes) on the voxel MSE to ``volume`` (training
        grid, ``(D, D, D)``). Returns the relative residuals after each stage."""
        target = volume.detach().float().to(self.positions.device)
        size = target.shape[-1]
        norm = float((target * target).sum().clamp(min=1e-30))
        with torch.no_grad():
            self.log_amplitude.zero_()
            model = self.rasterize(size)
            scale = float((model * target).sum() / (model * model).sum().clamp(min=1e-30))
            if not scale > 0:
                raise ValueError("the consensus map is not positive where the Gaussians were seeded")
            self.log_amplitude.fill_(math.log(scale))
            stage1 = float(((self.rasterize(size) - target) ** 2).sum()) / norm
        stage2 = stage1
        if steps > 0:
            opt = torch.optim.Adam([self.positions, self.log_sigma, self.log_amplitude], lr=lr)
            with torch.enable_grad():
                for _ in range(int(steps)):
                    opt.zero_grad(set_to_none=True)
                    loss = ((self.rasterize(size) - target) ** 2).sum() / norm
                    loss.backward()
                    opt.step()
                    stage2 = float(loss.detach())
            with torch.no_grad():
                stage2 = float(((self.rasterize(size) - target) ** 2).sum()) / norm
        return {"scale_residual": stage1, "fit_residual": stage2}
