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
from hetero.models.dynamight import distributed as dist
from hetero.physics.ctf import ctf_table_compute
from hetero.physics.fourier import fourier_crop_3d
from hetero.physics.projection import centered_grid_3d
from hetero.physics.reconstruction import BackprojectionAccumulator
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)


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


def initialize_consensus(m) -> None:
    """Fit both consensus models to their initial map (rank 0's result is broadcast)."""
    from hetero.data.io.mrc import read_volume

    cfg, d = m.cfg, m.box_size
    if cfg["consensus_map"]:
        vol, voxel = read_volume(cfg["consensus_map"])
        vol = resample_map(vol, voxel, d, m.apix, m.particle_diameter, str(cfg["consensus_map"]))
        maps = [vol, vol]
        log.info(f"Consensus map {cfg['consensus_map']} ({vol.shape[-1]} px at {voxel:.4g} Å) resampled to {d} px")
    else:
        dm = m.trainer.datamodule if m.trainer is not None else None
        if dm is None or getattr(dm, "train_dataset", None) is None:
            raise RuntimeError("model=dynamight without model.consensus_map needs the data module "
                               "to reconstruct the consensus maps (train through train.py)")
        maps, used = half_set_maps(dm, d, cfg["init_max_particles"], cfg["init_wiener_snr"],
                                   cfg["init_seed"], m.device)
        log.info(f"Consensus maps: backprojections of {len(used[0])} / {len(used[1])} particles of "
                 "half sets 1 / 2")
    gen = torch.Generator().manual_seed(cfg["init_seed"])
    for h, vae in enumerate(m.halves):
        threshold = vae.consensus.seed(maps[h], cfg["initial_threshold"], cfg["initial_quantile"], gen,
                                       cfg["initial_sampling"])
        res = vae.consensus.fit(maps[h].to(m.device), cfg["fit_steps"], cfg["fit_lr"])
        log.info(f"Half set {h + 1}: {vae.consensus.n_gaussians} Gaussians seeded above {threshold:.4g}; "
                 f"relative residual {res['scale_residual']:.3f} (scale) -> {res['fit_residual']:.3f} (fit)")
        for p in vae.consensus.parameters():
            dist.broadcast_(p.data)
    m.initialized.fill_(True)
