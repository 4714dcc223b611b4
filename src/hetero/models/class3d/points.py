"""The Fourier pixels of the expectation step, and central-slice values at just those pixels.

The E-step compares each image with each class at its fixed pose on the non-redundant half of
the image spectrum inside the current resolution limit, as RELION does (the FFTW half-plane
``kx >= 0`` without the duplicated ``kx = 0, ky < 0`` half column; ``Npix_per_shell`` counts
the same pixels). :class:`HalfPlanePoints` holds those pixels sorted by radius, so that every
resolution limit is a prefix of the list.

:func:`point_corners` / :func:`gather_points` are the sparse-point form of
:func:`hetero.physics.projection.slice_spectra` (same conventions, same trilinear
interpolation on the same :func:`~hetero.physics.projection.volume_rfft` half spectra, tested
equal to it): the interpolation corners depend only on the pose, so they are computed once per
particle and reused for every class map of every replicate.

Example usage::

    pts = HalfPlanePoints(box_size=64)
    m = pts.count_within(19)                              # pixels with round(|k|) <= 19
    idx, w, conj = point_corners(rotations, pts.coords[:m], spectra.shape[-3], pad=2)
    values = gather_points(spectra.reshape(-1), offsets, idx, w, conj)   # (P, K, m)
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The eight trilinear corner offsets (x, y, z), in the order of :func:`slice_spectra`.
_CORNERS = [[dx, dy, dz] for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]


class HalfPlanePoints:
    """The half-plane pixels of a centred ``D x D`` spectrum, sorted by radius.

    Pixel ``(kx, ky)`` (integers, cycles per box, ``-D/2 <= k < D/2``) is kept when ``kx > 0``,
    or ``kx == 0`` and ``ky >= 0`` (the DC term included), with ``round(|k|) <= D/2`` and
    ``ky > -D/2`` (so that its Hermitian partner ``-k`` lies in the centred grid too; RELION's
    half-plane also holds the ``ky = -D/2`` Nyquist row). Attributes (CPU tensors):

    - ``coords``: ``(M, 2)`` float32 ``(kx, ky)``;
    - ``flat``: ``(M,)`` long index into the row-major centred ``D x D`` array;
    - ``shell``: ``(M,)`` long ``round(|k|)``;
    - ``npix``: ``(D // 2 + 1,)`` float64 pixels per shell (RELION's ``Npix_per_shell``).

    :param box_size: image side ``D`` (even).
    """

    def __init__(self, box_size: int) -> None:
        d = int(box_size)
        if d % 2:
            raise ValueError(f"box_size must be even, got {d}")
        a = torch.arange(d) - d // 2
        ky, kx = torch.meshgrid(a, a, indexing="ij")
        radius = torch.sqrt((kx**2 + ky**2).double())
        shell = torch.round(radius).long()
        keep = ((kx > 0) | ((kx == 0) & (ky >= 0))) & (shell <= d // 2) & (ky > -d // 2)
        flat = torch.nonzero(keep.flatten()).squeeze(1)
        order = torch.argsort(radius.flatten()[flat], stable=True)
        self.box_size = d
        self.flat = flat[order]
        self.coords = torch.stack([kx.flatten()[self.flat], ky.flatten()[self.flat]], -1).float()
        self.shell = shell.flatten()[self.flat]
        self.n_shells = d // 2 + 1
        self.npix = torch.bincount(self.shell, minlength=self.n_shells).double()
        # cumulative counts: count_within(r) = number of pixels with shell <= r
        self._cum = torch.cumsum(torch.bincount(self.shell, minlength=self.n_shells), 0)

    def __len__(self) -> int:
        return int(self.flat.numel())

    def count_within(self, radius: int) -> int:
        """Number of leading pixels with ``round(|k|) <= radius`` (shells)."""
        r = int(radius)
        if r < 0:
            return 0
        return int(self._cum[min(r, self.n_shells - 1)])

    def take(self, spectra: Tensor, m: int | None = None) -> Tensor:
        """``(..., D, D)`` centred spectra -> ``(..., m)`` values at the first ``m`` pixels."""
        flat = self.flat if m is None else self.flat[:m]
        return spectra.reshape(*spectra.shape[:-2], -1)[..., flat.to(spectra.device)]


def point_corners(
    rotations: Tensor, points: Tensor, padded_size: int, pad: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Trilinear corners of the central-slice points ``A.T (kx, ky, 0)`` in a half spectrum.

    :param rotations: ``(B, 3, 3)`` RELION matrices ``A``.
    :param points: ``(M, 2)`` ``(kx, ky)`` in cycles per box of the volume.
    :param padded_size: side ``S`` of the padded grid of :func:`volume_rfft`.
    :param pad: ``S / T`` (padding factor of the volume spectra).
    :return: ``idx (B, M, 8)`` long flat indices into one ``(S, S, S // 2 + 1)`` half
        spectrum, ``w (B, M, 8)`` float32 weights (0 outside the grid, as in
        :func:`slice_spectra`) and ``conj (B, M, 8)`` bool (value taken from the mirrored
        frequency, to be conjugated).
    """
    s = int(padded_size)
    half = s // 2 + 1
    k3 = torch.cat([points, torch.zeros_like(points[:, :1])], -1).to(rotations.device, torch.float32)
    q = torch.einsum("mi,bij->bmj", k3, rotations.float()) * float(pad)          # (B, M, 3)
    inside = (q.abs() <= s / 2 - 1).all(-1)
    base = torch.floor(q)
    frac = q - base
    corners = torch.tensor(_CORNERS, device=q.device)
    c = base.long()[..., None, :] + corners                                      # (B, M, 8, 3)
    w = torch.where(corners.bool(), frac[..., None, :], 1 - frac[..., None, :]).prod(-1)
    neg = c[..., 0] < 0
    c = torch.where(neg[..., None], -c, c)
    idx = ((c[..., 2] % s) * s + (c[..., 1] % s)) * half + c[..., 0].clamp(max=half - 1)
    return idx, w * inside[..., None], neg


def gather_points(
    flat_spectra: Tensor, offsets: Tensor, idx: Tensor, w: Tensor, conj: Tensor
) -> Tensor:
    """Central-slice values of several maps at the points of :func:`point_corners`.

    :param flat_spectra: all half spectra, flattened, complex.
    :param offsets: ``(P, K)`` long: start of the map used for row ``p`` and class ``k``.
    :param idx, w, conj: ``(P, M, 8)`` corners of the pose of row ``p`` (index the output of
        :func:`point_corners` by each row's particle).
    :return: ``(P, K, M)`` complex values ``F[V](A.T k)``.
    """
    out = None
    for c in range(idx.shape[-1]):  # one corner at a time keeps the gathered block small
        v = flat_spectra[offsets[:, :, None] + idx[:, None, :, c]]
        v = torch.where(conj[:, None, :, c], v.conj(), v) * w[:, None, :, c]
        out = v if out is None else out + v
    return out
