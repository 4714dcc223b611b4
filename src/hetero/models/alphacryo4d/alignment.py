"""Rigid 3-D alignment of a volume to a reference (AlphaCryo4D's ``fit.sh``, which called
EMAN2's ``e2proc3d.py --align rotate_translate_3d_tree``).

Only needed for volumes made elsewhere: the volumes hetero resamples share the consensus
frame. The search maximises the normalised cross-correlation over rotations and translations:

1. both maps are z-scored and Fourier-cropped to ``search_size`` voxels (a low-pass);
2. a seeded, uniformly random set of ``n_coarse`` rotations is scored, the best translation of
   each found at once by FFT cross-correlation;
3. the best rotation is refined by ``refine_rounds`` rounds of ``refine_samples`` random
   perturbations whose largest angle shrinks by 0.7 every round;
4. the rotation is polished with smaller perturbations on a grid twice as fine (up to the full
   size);
5. the full-size map is rotated, and the translation found by FFT cross-correlation on the full
   grid (whole voxels).

Example usage::

    aligned, info = align_volume(volume, reference)    # info["rotation"], info["shift"], ...
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from hetero.physics.fourier import fourier_crop_3d
from hetero.physics.projection import rotate_volume
from hetero.physics.rotations import quaternion_to_matrix, random_rotations


def _zscore(v: Tensor) -> Tensor:
    v = v - v.mean(dim=(-3, -2, -1), keepdim=True)
    return v / v.flatten(-3).std(-1)[..., None, None, None].clamp_min(1e-12)


def _best_shifts(volumes: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    """Circular cross-correlation of each of ``volumes`` ``(B, S, S, S)`` with ``reference``:
    ``(scores (B,), shifts (B, 3) in voxels, (z, y, x), to apply to the volumes)``."""
    s = volumes.shape[-1]
    cc = torch.fft.irfftn(torch.fft.rfftn(reference, dim=(-3, -2, -1)).conj()[None]
                          * torch.fft.rfftn(volumes, dim=(-3, -2, -1)), s=(s, s, s), dim=(-3, -2, -1))
    flat = cc.flatten(1)
    score, idx = flat.max(1)
    zyx = torch.stack(torch.unravel_index(idx, (s, s, s)), 1)
    zyx = torch.where(zyx > s // 2, zyx - s, zyx)
    return score / s**3, -zyx.to(volumes.dtype)


def shift_volume(volume: Tensor, shift_zyx: Tensor) -> Tensor:
    """Translate ``(D, D, D)`` by ``shift_zyx`` voxels (Fourier phase ramp, periodic)."""
    d = volume.shape[-1]
    k = torch.fft.fftfreq(d, device=volume.device, dtype=volume.dtype)
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    phase = torch.exp(-2j * math.pi * (kz * shift_zyx[0] + ky * shift_zyx[1] + kx * shift_zyx[2]))
    return torch.fft.ifftn(torch.fft.fftn(volume) * phase).real


def _perturb(rotation: Tensor, angle_deg: float, n: int, generator: torch.Generator) -> Tensor:
    """``n`` rotations ``R_i @ rotation`` with random axes and angles up to ``angle_deg``."""
    axis = torch.randn(n, 3, generator=generator, dtype=rotation.dtype)
    axis = axis / axis.norm(dim=1, keepdim=True)
    half = torch.deg2rad(torch.rand(n, generator=generator, dtype=rotation.dtype) * angle_deg) / 2
    q = torch.cat([torch.cos(half)[:, None], torch.sin(half)[:, None] * axis], 1)
    return quaternion_to_matrix(q) @ rotation


def _score(small: Tensor, ref: Tensor, rotations: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    scores, shifts = [], []
    for lo in range(0, len(rotations), chunk):
        rot = rotate_volume(small, rotations[lo : lo + chunk])
        sc, sh = _best_shifts(_zscore(rot), ref)
        scores.append(sc)
        shifts.append(sh)
    return torch.cat(scores), torch.cat(shifts)


@torch.no_grad()
def align_volume(
    volume: np.ndarray | Tensor,
    reference: np.ndarray | Tensor,
    search_size: int = 32,
    n_coarse: int = 2000,
    refine_rounds: int = 12,
    refine_samples: int = 48,
    refine_angle_deg: float = 25.0,
    seed: int = 0,
    chunk: int = 64,
) -> tuple[np.ndarray, dict]:
    """Rotate and translate ``volume`` onto ``reference`` (both ``(D, D, D)``).

    :return: ``(aligned (D, D, D) float32, info)`` with ``rotation`` (3, 3) (RELION ``A`` of
        :func:`hetero.physics.projection.rotate_volume`: aligned(r) = volume(A.T r) before
        the shift), ``shift`` (3,) voxels (z, y, x), ``score`` (normalised cross-correlation
        on the full grid) and ``coarse_score``.
    """
    vol = torch.as_tensor(np.asarray(volume), dtype=torch.float64)
    ref = torch.as_tensor(np.asarray(reference), dtype=torch.float64)
    if vol.shape != ref.shape or vol.dim() != 3:
        raise ValueError(f"align_volume: volume {tuple(vol.shape)} and reference {tuple(ref.shape)} must be equal cubes")
    size = min(int(search_size), vol.shape[-1])
    small = _zscore(fourier_crop_3d(vol, size))
    small_ref = _zscore(fourier_crop_3d(ref, size))
    gen = torch.Generator().manual_seed(int(seed))
    rotations = torch.cat([torch.eye(3, dtype=torch.float64)[None],
                           random_rotations(int(n_coarse), generator=gen)])
    scores, _ = _score(small, small_ref, rotations, chunk)
    best = rotations[int(scores.argmax())]
    best_score = float(scores.max())
    angle = float(refine_angle_deg)
    for _ in range(int(refine_rounds)):
        cand = torch.cat([best[None], _perturb(best, angle, int(refine_samples), gen)])
        sc, _ = _score(small, small_ref, cand, chunk)
        if float(sc.max()) > best_score:
            best, best_score = cand[int(sc.argmax())], float(sc.max())
        angle *= 0.7
    # polish on a finer grid with small perturbations
    fine = min(vol.shape[-1], 2 * size)
    if fine > size:
        small, small_ref = _zscore(fourier_crop_3d(vol, fine)), _zscore(fourier_crop_3d(ref, fine))
        best_score = float(_score(small, small_ref, best[None], chunk)[0][0])
        angle = 4.0
        for _ in range(int(refine_rounds) // 2):
            cand = _perturb(best, angle, int(refine_samples) // 2, gen)
            sc, _ = _score(small, small_ref, cand, chunk)
            if float(sc.max()) > best_score:
                best, best_score = cand[int(sc.argmax())], float(sc.max())
            angle *= 0.7
    rotated = rotate_volume(vol, best[None])[0]
    full_score, shift = _best_shifts(_zscore(rotated)[None], _zscore(ref))
    aligned = shift_volume(rotated, shift[0])
    info = {"rotation": best.numpy(), "shift": shift[0].numpy(), "score": float(full_score[0]),
            "coarse_score": best_score}
    return aligned.float().numpy(), info
