"""Reconstruction with known poses and CTF: Fourier-space backprojection with a CTF^2 (Wiener)
filter, accumulated in batches so memory does not grow with the number of particles.

The data model is :func:`hetero.physics.projection.render`: ``image = T_t[CTF * P_A V]``. Each
``(D, D)`` image is zero-padded in real space to ``(P, P)`` (``P = pad_factor * D``), Fourier
transformed, un-shifted, multiplied by its CTF evaluated on that padded grid and inserted
(trilinear, the exact adjoint of :func:`~hetero.physics.projection.slice_spectrum`) into the
``(P, P, P)`` spectrum; the CTF^2 goes into a weight grid. The estimate is
``num / (weight + 1/snr)`` voxel by voxel (``snr=inf`` gives plain weighted backprojection),
followed by an inverse FFT, cropping and a gridding correction. Padding the images, as RELION
does, samples every voxel of the padded grid, including the fractional frequencies
``|k| < 1`` (in units of ``1 / (D * apix)``) that ``D``-sized slices would leave to
interpolation; without it the total density of an off-centre map came out ~40 % low.

The CTF must be given on the grid :attr:`BackprojectionAccumulator.ctf_size` (same pixel size):
``compute_ctf(acc.ctf_size, apix, ...)``. Callers never assume which grid that is.

Example usage::

    acc = BackprojectionAccumulator(box_size=64)
    for batch in loader:
        ctf = compute_ctf(acc.ctf_size, apix, *ctf_params)
        acc.add(batch_images, rotations, shifts_px=-origin_px, ctf=ctf)
    volume = acc.reconstruct(wiener_snr=10.0)
"""

from __future__ import annotations

import torch
from torch import Tensor

from hetero.physics.fourier import fft2_centered, ifft3_centered, phase_ramp_2d, radius_grid
from hetero.physics.projection import gridding_correction, insert_slices


class BackprojectionAccumulator:
    """Running sums of CTF-weighted slices (numerator) and CTF^2 (weights) for one volume.

    Pure tensor state, no I/O; use two accumulators for half maps.

    :param box_size: side D of images and volume (pixels).
    :param pad_factor: oversampling of the 3-D Fourier grid (2 is accurate, 1 is cheap).
    """

    def __init__(self, box_size: int, pad_factor: int = 2, device=None, dtype=torch.float64):
        self.box_size = box_size
        self.pad_factor = pad_factor
        self.padded_size = pad_factor * box_size
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        self.numerator = torch.zeros((self.padded_size,) * 3, dtype=cdtype, device=device)
        self.weight = torch.zeros((self.padded_size,) * 3, dtype=dtype, device=device)
        self.count = 0

    @property
    def ctf_size(self) -> int:
        """Side of the square grid on which :meth:`add` expects the CTF (pixels, same pixel size
        as the images): ``compute_ctf(acc.ctf_size, apix, ...)``."""
        return self.padded_size

    def add(
        self,
        images: Tensor,
        rotations: Tensor,
        shifts_px: Tensor | None = None,
        ctf: Tensor | None = None,
    ) -> None:
        """Insert a batch.

        :param images: ``(B, D, D)`` particle images following the forward model.
        :param rotations: ``(B, 3, 3)`` RELION matrices. :param shifts_px: ``(B, 2)`` forward
            translation ``t`` (``-origin`` in RELION terms) in pixels.
        :param ctf: ``(B, P, P)`` CTF on the padded grid (``P = padded_size``; see the module
            docstring), or ``None`` for none.
        """
        dtype = self.weight.dtype
        d, p = self.box_size, self.padded_size
        if images.shape[-2:] != (d, d):
            raise ValueError(f"images must be (B, {d}, {d}), got {tuple(images.shape)}")
        if ctf is not None and ctf.shape[-2:] != (p, p):
            raise ValueError(
                f"ctf must be evaluated on the padded ({p}, {p}) grid, got {tuple(ctf.shape)}: "
                f"use compute_ctf({p}, pixel_size_angstrom, ...) (same pixel size)"
            )
        padded = images.to(dtype)
        if p != d:
            o = p // 2 - d // 2  # keeps the real-space centre at index P // 2
            padded = torch.nn.functional.pad(padded, (o, p - d - o, o, p - d - o))
        f = fft2_centered(padded)
        if shifts_px is not None:
            f = f * phase_ramp_2d(-shifts_px.to(dtype), p)
        w = torch.ones_like(f.real) if ctf is None else ctf.to(dtype)
        self.numerator += insert_slices(f * w, rotations.to(dtype), p)
        self.weight += insert_slices(w * w, rotations.to(dtype), p)
        self.count += images.shape[0]

    def merge(self, other: BackprojectionAccumulator) -> None:
        """Add another accumulator's sums (e.g. from another worker)."""
        self.numerator += other.numerator
        self.weight += other.weight
        self.count += other.count

    def reconstruct(
        self, wiener_snr: float = float("inf"), min_weight: float = 1e-3
    ) -> Tensor:
        """The real-space ``(D, D, D)`` estimate.

        :param wiener_snr: constant Wiener regulariser ``1/snr`` added to the weights
            (``inf``: none; voxels with weight below ``min_weight`` are then set to zero).
        :param min_weight: relative threshold (fraction of the median non-zero weight) below
            which a Fourier voxel counts as unmeasured.

        Known limitation: dividing by trilinearly spread weights is a normalised-gridding
        estimate, slightly biased where the spectrum oscillates fast; the total density of a
        map whose mass sits 7 px off-centre in a 24 px box comes out ~5 % high at
        ``pad_factor=2`` (~3 % at 3). RELION's iterative density compensation would remove it.
        """
        weight = self.weight
        nz = weight[weight > 0]
        floor = min_weight * (nz.median() if nz.numel() else torch.tensor(1.0))
        if wiener_snr == float("inf"):
            spec = torch.where(weight > floor, self.numerator / weight.clamp(min=floor), 0)
        else:
            spec = self.numerator / (weight + 1.0 / wiener_snr)
        # Restrict to the sphere of the original Nyquist radius (corners are not measured evenly).
        r = radius_grid((self.padded_size,) * 3, device=weight.device, dtype=weight.dtype)
        spec = torch.where(r <= self.padded_size / 2, spec, 0)
        big = ifft3_centered(spec).real
        d, p = self.box_size, self.padded_size // 2 - self.box_size // 2
        vol = big[p : p + d, p : p + d, p : p + d]
        # Dividing by the trilinearly spread weights leaves the spectrum convolved with the
        # trilinear kernel, i.e. the map multiplied by sinc^2(x / P) per axis: undo it.
        return vol / gridding_correction(d, self.padded_size, device=vol.device, dtype=vol.dtype)


def backproject(
    images: Tensor,
    rotations: Tensor,
    shifts_px: Tensor | None = None,
    ctf: Tensor | None = None,
    pad_factor: int = 2,
    wiener_snr: float = float("inf"),
) -> Tensor:
    """One-shot reconstruction of a ``(D, D, D)`` volume from ``(N, D, D)`` images in memory;
    ``ctf`` is ``(N, P, P)`` on the padded grid, ``P = pad_factor * D``."""
    acc = BackprojectionAccumulator(images.shape[-1], pad_factor, device=images.device)
    acc.add(images, rotations, shifts_px, ctf)
    return acc.reconstruct(wiener_snr)


__all__ = ["BackprojectionAccumulator", "backproject"]
