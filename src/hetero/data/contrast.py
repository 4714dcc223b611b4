"""Is the protein white in these images? ``data.invert_contrast: auto``.

hetero's convention is white density (:mod:`hetero.physics.conventions`): protein positive in
the maps and, before the CTF, in the projections. A stack extracted without RELION's contrast
inversion (or a cryoSPARC stack whose ``blob/sign`` was lost) is black, and every model would
learn a negative map. With the consensus poses and CTF the sign can be measured:

1. ``n_sample`` particles (seeded) are split into halves A and B and brought to a small box
   (Fourier crop to at most ``check_box`` px).
2. Half A is reconstructed with its CTF (:class:`~hetero.physics.reconstruction.BackprojectionAccumulator`,
   Wiener), low-passed to ``D / 4`` shells. A protein map is a few dense features on flat
   solvent, so its voxel values are skewed towards the protein's sign: the statistic
   ``contrast`` is the skewness of the map inside the central sphere (radius ``D / 4``),
   positive for white density, negative for black, near 0 for noise. (Measured on the built-in
   synthetic sets, 300 particles, box 48: +1.7 to +2.4 for white at SNR 0.05 and 0.01, and the
   same negated for inverted images; the mean-inside-minus-outside contrast was only
   0.2-0.3 standard deviations.)
3. Projections of the half-A map at half B's poses, with B's CTF, are correlated with half B's
   images: ``cross_cc`` (positive for either sign when the map carries signal) tells whether
   the map means anything at all.

The sign is decided when ``|contrast| >= margin`` and ``cross_cc >= min_cross_cc``; otherwise
the check is ambiguous and the data module refuses with a message asking for an explicit
``data.invert_contrast=true|false``.

Example usage::

    result = measure_contrast(dataset, n_sample=300)
    invert = result.invert          # True for black-density input; None when ambiguous
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hetero.physics.ctf import ctf_table_compute
from hetero.physics.fourier import fft3_centered, fourier_crop_2d, ifft3_centered, radius_grid
from hetero.physics.reconstruction import BackprojectionAccumulator


@dataclass
class ContrastCheck:
    """Outcome of :func:`measure_contrast`."""

    contrast: float
    cross_cc: float
    n_particles: int
    box: int
    margin: float
    min_cross_cc: float

    @property
    def invert(self) -> bool | None:
        """``True``: black input (invert it); ``False``: white; ``None``: ambiguous."""
        if self.cross_cc < self.min_cross_cc or abs(self.contrast) < self.margin:
            return None
        return self.contrast < 0

    def describe(self) -> str:
        verdict = {None: "ambiguous", True: "black (inverted)", False: "white"}[self.invert]
        return (
            f"contrast check on {self.n_particles} particles at box {self.box}: map contrast "
            f"{self.contrast:+.2f} (margin {self.margin}), half-map projection correlation "
            f"{self.cross_cc:.3f} (minimum {self.min_cross_cc}) -> {verdict}"
        )


def _lowpass(volume: torch.Tensor, shells: float) -> torch.Tensor:
    spec = fft3_centered(volume)
    r = radius_grid(tuple(volume.shape), dtype=volume.dtype)
    return ifft3_centered(spec * (r <= shells)).real


def _map_contrast(volume: torch.Tensor) -> float:
    """Skewness of the voxel values inside the central sphere of radius ``D / 4``."""
    d = volume.shape[-1]
    r = radius_grid(tuple(volume.shape), dtype=volume.dtype)
    inner = volume[r < d / 4]
    x = inner - inner.mean()
    return float((x**3).mean() / (x**2).mean().clamp(min=1e-30) ** 1.5)


def measure_contrast(
    dataset,
    n_sample: int = 300,
    seed: int = 0,
    check_box: int = 32,
    lowpass_shells: float | None = None,
    wiener_snr: float = 0.1,
    margin: float = 0.5,
    min_cross_cc: float = 0.02,
) -> ContrastCheck:
    """Measure the contrast sign of a :class:`~hetero.data.dataset.ParticleDataset` built
    *without* contrast inversion (module docstring). Needs poses; uses the CTF when present.

    :raises ValueError: the dataset has no poses.
    """
    from hetero.models.components.renderer import Renderer, recenter_images

    if not dataset.has_poses:
        raise ValueError("the contrast check needs poses")
    n = min(int(n_sample), len(dataset))
    rng = np.random.default_rng(seed)
    pos = np.sort(rng.choice(len(dataset), size=n, replace=False))
    batch = dataset.read_batch(pos)
    box = dataset.box_size
    small = min(box, int(check_box))
    images = recenter_images(batch["image"].float(), batch["origin_px"].float())
    apix = batch["apix"].double()
    if small != box:
        images = fourier_crop_2d(images, small)
        apix = apix * box / small
    images = images.double()
    rot = batch["rotation"].double()
    ctf = ctf_table_compute(batch["ctf"].double(), small, apix) if dataset.has_ctf else None
    half_a, half_b = np.arange(n) % 2 == 0, np.arange(n) % 2 == 1
    acc = BackprojectionAccumulator(small)
    acc.add(images[half_a], rot[half_a], None, None if ctf is None else ctf[half_a])
    volume = acc.reconstruct(wiener_snr=wiener_snr)
    volume = _lowpass(volume, lowpass_shells if lowpass_shells is not None else small / 4)
    contrast = _map_contrast(volume)
    renderer = Renderer(small, small)
    params = batch["ctf"][torch.from_numpy(half_b)] if dataset.has_ctf else None
    pred = renderer(volume.float(), rot[half_b].float(), params, apix[half_b].float())
    if not dataset.has_ctf:
        pred = pred.float()
    a = pred.flatten(1).double()
    b = images[half_b].flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    cc = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-12)
    return ContrastCheck(
        contrast=contrast, cross_cc=float(cc.mean()), n_particles=n, box=small,
        margin=margin, min_cross_cc=min_cross_cc,
    )
