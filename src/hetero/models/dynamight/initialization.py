"""The map the consensus Gaussians are fitted to: the user's map or a backprojection.

- ``model.consensus_map=<file.mrc>``: any box and pixel size. The map is Fourier-resampled to
  the training pixel size, then centre-cropped or zero-padded to the training box
  (:func:`resample_map`). Its extent must cover the particle (the circle of
  ``particle_diameter`` the encoder sees); otherwise :func:`resample_map` refuses it, naming the
  file and both extents. Both half sets start from this map (as in the reference).
- default: one Wiener-filtered backprojection per half set from that half's training particles
  with their poses and CTF (:func:`half_set_maps`), so the two consensus models never see the
  other half's particles.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hetero.data.io.errors import InputError
from hetero.physics.ctf import ctf_table_compute
from hetero.physics.fourier import fourier_crop_3d
from hetero.physics.projection import centered_grid_3d
from hetero.physics.reconstruction import BackprojectionAccumulator


def resample_map(
    volume: np.ndarray | Tensor,
    voxel_size: float,
    box_size: int,
    apix: float,
    required_diameter: float,
    source: str = "the consensus map",
) -> Tensor:
    """Resample a ``(M, M, M)`` map of ``voxel_size`` Å onto the training grid ``(D, D, D)`` of
    ``apix`` Å (centres at index ``M // 2`` and ``D // 2`` coincide).

    :param required_diameter: the map must span at least this many Å (the particle diameter).
    :raises InputError: unknown voxel size, or an extent that cannot cover the particle.
    """
    vol = torch.as_tensor(np.asarray(volume), dtype=torch.float64)
    m = int(vol.shape[-1])
    if not voxel_size > 0:
        raise InputError(f"{source}: the header has no voxel size; write it into the map (e.g. relion_image_handler --angpix)")
    extent = m * voxel_size
    if extent < required_diameter - 1e-6:
        raise InputError(
            f"{source}: the map spans {m} x {voxel_size:.4g} Å = {extent:.1f} Å, less than the "
            f"particle diameter {required_diameter:.1f} Å the training box needs "
            f"({box_size} px x {apix:.4g} Å); give a map that covers the particle "
            "(or lower model.particle_diameter)"
        )
    # 1. Fourier-resample to (almost) the training pixel size.
    n = max(2, int(round(m * voxel_size / apix)))
    vol = fourier_crop_3d(vol, n)
    scale = (m * voxel_size / n) / apix  # residual pixel-size ratio, |scale - 1| <= 1 / (2 n)
    # 2. Trilinear onto the training grid (exact pixel size; zero outside the map).
    grid = centered_grid_3d(box_size, dtype=torch.float64) / scale
    coords = (grid + n // 2) * (2.0 / (n - 1)) - 1.0
    out = F.grid_sample(vol[None, None], coords[None], mode="bilinear", padding_mode="zeros",
                        align_corners=True)[0, 0]
    return out.float()


@torch.no_grad()
def half_set_maps(
    datamodule, box_size: int, max_particles: int, wiener_snr: float, seed: int, device,
    batch_size: int = 64,
) -> tuple[list[Tensor], list[np.ndarray]]:
    """One backprojection per half set from its training particles (same on every rank).

    :return: two ``(D, D, D)`` float32 maps and, for each, the table rows used.
    """
    dm = datamodule
    halves = np.asarray(dm.table.half_set)[dm.train_indices]
    rng = np.random.default_rng(seed)
    maps, used = [], []
    for h in (0, 1):
        positions = np.flatnonzero(halves == h)
        if len(positions) == 0:
            raise InputError(f"half set {h + 1} has no training particles; cannot build its consensus map")
        positions = np.sort(rng.permutation(positions)[: int(max_particles)])
        acc = BackprojectionAccumulator(box_size, pad_factor=2, device=device, dtype=torch.float32)
        for start in range(0, len(positions), batch_size):
            batch = dm.train_dataset.read_batch(positions[start : start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            ctf = None
            if dm.train_dataset.has_ctf:
                ctf = ctf_table_compute(batch["ctf"].float(), acc.ctf_size, batch["apix"].float())
            acc.add(batch["image"].float(), batch["rotation"].float(), -batch["origin_px"].float(), ctf)
        maps.append(acc.reconstruct(wiener_snr=wiener_snr).float())
        used.append(dm.train_indices[positions])
    return maps, used
