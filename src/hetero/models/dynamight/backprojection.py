"""Deformed weighted backprojection (DynaMight paper eqs. 6-7; notes section 7).

The paper reconstructs the consensus density ``f`` from particles whose density is ``f``
deformed by ``Gamma_i`` (``Gamma_i(x) = x + d(x, z_i)`` moves consensus point ``x``)::

    f = argmin sum_i || C_i P_i(f o Gamma_i^-1) - y_i ||^2                             (6)
      = [sum_i P*_Gamma_i C_i^2 P_Gamma_i]^-1 [sum_i P*_Gamma_i C_i y_i] = D^-1 [...]    (7)

With a mass-preserving deformation (the Gaussians keep their amplitudes), the adjoint of the
deformed projection is the rigid backprojection *pulled back* through ``Gamma_i``:
``(P*_Gamma_i g)(x) = (P_i* g)(Gamma_i(x))`` -- the image data found at the deformed position
``Gamma_i(x)`` are brought to the consensus point ``x`` (transport by ``Gamma_i^-1``).

**Discretisation used here (exact for piecewise-rigid motion).** The consensus is split into
``R`` regions (k-means of the consensus Gaussians). For each particle and region, the
deformation is fitted by the rigid motion ``Gamma_i(x) ~ Q_ir x + s_ir`` (weighted Kabsch on the
pairs ``(c_j, Gamma_i(c_j))`` of the region's Gaussians -- the pairs on which the inverse is
exact, ``Gamma^-1(Gamma(c_j)) = c_j``, paper "Improved 3D reconstruction"). Pulling the rigid
backprojection ``b(u) = y'_i(Pi A_i u)`` back through it gives ``b(Q x + s) = y'_i(Pi A_i Q x +
Pi A_i s)``: a *rigid* backprojection at rotation ``A_i Q_ir`` of the image translated by
``-Pi A_i s_ir``. So each region has its own RELION-style Fourier accumulator
(:class:`hetero.physics.reconstruction.BackprojectionAccumulator`), into which every particle is
inserted at its locally corrected pose; the ``CTF^2`` weights are inserted at the same
corrected orientation -- i.e. the normal operator ``D`` of eq. 7 is deformed the same way,
exactly for rigid pieces (a rigid motion changes ``D`` only by rotating the slices; the reference
leaves the weights rigid). Each region's map is computed with RELION's gridding and density
compensation and a per-shell ``1 / tau^2`` from the half-map FSC (``tau^2 = SSNR * sigma^2``,
``SSNR = FSC / (1 - FSC)``, RELION's ``update_tau2_with_fsc`` for half maps; through
:func:`hetero.models.class3d.mstep.regularised_reconstruct`), and the maps are blended with a
smooth partition of unity over the regions (Gaussian weights around the region centres,
normalised to sum 1 in every voxel). With zero deformation every region's accumulator equals
the rigid one, and the blend equals the rigid reconstruction to float rounding. ``R = 1``
without local motion is the rigid reconstruction of the same particles.

Cost per particle: ``R`` rigid insertions; memory ``R`` accumulators per half set, whatever the
number of particles.

Example usage::

    regions = make_regions(consensus_angstrom, n_regions=8)
    bp = DeformedBackprojection(box_size=128, n_regions=8)
    for batch in loader:      # one half set's particles
        rot, shift = local_rigid_transforms(consensus_angstrom, deformed_angstrom, regions.assignment, 8)
        bp.add(images, rotations, -origin_px, ctf, rot, shift / apix)
    half1 = bp.maps(...)      # see reconstruct_half_maps
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hetero.models.class3d.mstep import regularised_reconstruct
from hetero.physics.fsc import fsc
from hetero.physics.reconstruction import BackprojectionAccumulator


@dataclass
class Regions:
    """A split of the consensus into regions.

    ``centres``: ``(R, 3)`` Å (x, y, z) from the box centre; ``assignment``: ``(N,)`` region of
    each consensus point; ``sigma``: Å, width of the blending weights.
    """

    centres: Tensor
    assignment: Tensor
    sigma: float

    @property
    def n(self) -> int:
        return int(self.centres.shape[0])

    def weights(self, box_size: int, apix: float, device=None) -> Tensor:
        """``(R, D, D, D)`` blending weights on a ``D^3`` grid of ``apix`` Å (voxel ``[z, y, x]``
        at ``((x, y, z) index - D // 2) * apix``): ``w_r = softmax_r(-|x - c_r| / sigma)``, a
        partition of unity (sum 1 in every voxel) whose transition between two regions is a
        logistic of width ``~2 sigma`` whatever their distance (a softmax of squared distances
        would make hard edges between distant centres, whose multiplication into the region
        maps would add high-frequency structure common to both half maps)."""
        from hetero.models.dynamight.inverse import grid_points

        if self.n == 1:
            return torch.ones((1,) + (box_size,) * 3, device=device)
        x = grid_points(box_size, apix, device=device)
        d = torch.cdist(x, self.centres.to(x))  # (M, R)
        w = torch.softmax(-d / self.sigma, dim=1)
        return w.T.reshape((self.n,) + (box_size,) * 3)


def make_regions(points: Tensor, n_regions: int, sigma_angstrom: float | None = None, seed: int = 0) -> Regions:
    """``n_regions`` regions of the consensus points ``(N, 3)`` Å by k-means (scikit-learn).

    :param sigma_angstrom: edge width of the blending weights (:meth:`Regions.weights`);
        ``None``: a quarter of the median distance from a region centre to its nearest other
        centre.
    :raises ValueError: fewer points than ``3 x n_regions`` (each region needs 3 points for a
        rotation).
    """
    from sklearn.cluster import KMeans

    pts = points.detach().double().cpu().numpy()
    r = int(n_regions)
    if r < 1 or len(pts) < 3 * r:
        raise ValueError(f"{len(pts)} consensus points cannot make {r} regions of >= 3 points")
    if r == 1:
        return Regions(torch.as_tensor(pts.mean(0, keepdims=True)).float(),
                       torch.zeros(len(pts), dtype=torch.long), float("inf"))
    km = KMeans(n_clusters=r, n_init=10, random_state=seed).fit(pts)
    centres = torch.as_tensor(km.cluster_centers_).float()
    if sigma_angstrom is None:
        dist = torch.cdist(centres, centres) + torch.eye(r) * 1e30
        sigma_angstrom = 0.25 * float(dist.min(1).values.median())
    return Regions(centres, torch.as_tensor(km.labels_, dtype=torch.long), float(sigma_angstrom))


def local_rigid_transforms(
    rest: Tensor, deformed: Tensor, assignment: Tensor, n_regions: int, rotation: bool = True
) -> tuple[Tensor, Tensor]:
    """Least-squares rigid motion per particle and region: ``deformed ~ Q rest + s``.

    Weighted Kabsch (Kabsch 1976) on each region's points, in float64.

    :param rest: ``(N, 3)`` consensus points. :param deformed: ``(B, N, 3)`` their images.
    :param assignment: ``(N,)`` region index. :param rotation: ``False``: translations only.
    :return: ``Q (B, R, 3, 3)`` proper rotations and ``s (B, R, 3)`` (units of the points).
    """
    dev = deformed.device
    p = rest.to(dev, torch.float64)
    q = deformed.to(torch.float64)
    w = torch.nn.functional.one_hot(assignment.to(dev), n_regions).T.to(torch.float64)  # (R, N)
    count = w.sum(1).clamp(min=1)
    pc = (w @ p) / count[:, None]                                  # (R, 3)
    qc = torch.einsum("rn,bnk->brk", w, q) / count[None, :, None]  # (B, R, 3)
    b = q.shape[0]
    if not rotation:
        rot = torch.eye(3, dtype=torch.float64, device=dev).expand(b, n_regions, 3, 3).clone()
    else:
        h = torch.einsum("rn,ni,bnk->brik", w, p, q) - count[None, :, None, None] * (
            pc[None, :, :, None] * qc[:, :, None, :])
        u, _, vt = torch.linalg.svd(h)
        v = vt.transpose(-1, -2)
        sign = torch.sign(torch.linalg.det(v @ u.transpose(-1, -2)))
        fix = torch.diag_embed(torch.stack([torch.ones_like(sign), torch.ones_like(sign), sign], -1))
        rot = v @ fix @ u.transpose(-1, -2)
    shift = qc - torch.einsum("brij,rj->bri", rot, pc)
    return rot.float(), shift.float()


class DeformedBackprojection:
    """One half set's sums: a :class:`BackprojectionAccumulator` per region (module docstring).

    :param box_size: side ``D`` of images and maps. :param n_regions: ``R``.
    :param pad_factor, device, dtype, preweight_iterations: of the accumulators.
    """

    def __init__(self, box_size: int, n_regions: int = 1, pad_factor: int = 2, device=None,
                 dtype=torch.float32, preweight_iterations: int = 10) -> None:
        self.accumulators = [
            BackprojectionAccumulator(box_size, pad_factor, device=device, dtype=dtype,
                                      preweight_iterations=preweight_iterations)
            for _ in range(int(n_regions))
        ]
        self.box_size = int(box_size)

    @property
    def count(self) -> int:
        return self.accumulators[0].count if self.accumulators else 0

    @property
    def n_regions(self) -> int:
        return len(self.accumulators)

    def add(self, images: Tensor, rotations: Tensor, shifts_px: Tensor | None, ctf: Tensor | None,
            local_rotations: Tensor | None = None, local_shifts_px: Tensor | None = None) -> None:
        """Insert a batch into every region at its locally corrected pose.

        :param images: ``(B, D, D)``; :param rotations: ``(B, 3, 3)`` RELION ``A``;
        :param shifts_px: ``(B, 2)`` forward translations (RELION ``-origin``), as
            :meth:`BackprojectionAccumulator.add`; :param ctf: ``(B, D, D)`` or ``None``.
        :param local_rotations: ``(B, R, 3, 3)`` ``Q`` and :param local_shifts_px: ``(B, R, 3)``
            ``s`` (pixels) of the local motion ``x -> Q x + s`` (:func:`local_rigid_transforms`);
            ``None``: no motion (rigid backprojection).
        """
        rot = rotations.float()
        t = torch.zeros(rot.shape[0], 2, device=rot.device) if shifts_px is None else shifts_px.float()
        for r, acc in enumerate(self.accumulators):
            if local_rotations is None:
                acc.add(images, rot, t, ctf)
                continue
            a = rot @ local_rotations[:, r].to(rot)
            extra = torch.einsum("bij,bj->bi", rot, local_shifts_px[:, r].to(rot))[:, :2]
            acc.add(images, a, t + extra, ctf)

    def all_reduce(self) -> None:
        """Sum the accumulators over ``torch.distributed`` ranks (no-op in one process)."""
        from hetero.models.dynamight.distributed import all_reduce_sum, world_size

        if world_size() <= 1:
            return
        for acc in self.accumulators:
            all_reduce_sum(torch.view_as_real(acc.numerator))
            all_reduce_sum(acc.weight)
            count = all_reduce_sum(torch.tensor([float(acc.count)], dtype=torch.float64,
                                                device=acc.weight.device))
            acc.count = int(count.item())

    def region_maps(self, wiener_snr: float = 1.0, data_vs_prior: Tensor | None = None) -> Tensor:
        """``(R, D, D, D)`` float32 maps: with a constant Wiener term ``1 / wiener_snr``
        (``data_vs_prior=None``), or with RELION's per-shell ``1 / tau^2`` prior given as
        ``data_vs_prior (D // 2 + 1,)`` (``SSNR`` per shell)."""
        out = []
        for acc in self.accumulators:
            if data_vs_prior is None:
                out.append(acc.reconstruct(wiener_snr=wiener_snr).float())
            else:
                vol, _ = regularised_reconstruct(acc, None, 1.0, self.box_size // 2,
                                                 data_vs_prior=data_vs_prior)
                out.append(vol)
        return torch.stack(out)


def blend(region_maps: Tensor, weights: Tensor) -> Tensor:
    """``sum_r w_r f_r`` of ``(R, D, D, D)`` maps and weights -> ``(D, D, D)``."""
    return (region_maps * weights.to(region_maps)).sum(0)


def half_map_ssnr(curve: Tensor) -> Tensor:
    """RELION's SSNR of a half map from the half-map FSC: ``FSC / (1 - FSC)`` with the FSC
    clipped to ``[0.001, 0.999]`` (``BackProjector::updateSSNRarrays``, half maps); shell 0 as
    shell 1 (no prior on the mean density, which RELION never reconstructs from the DC term)."""
    f = curve.double().clamp(0.001, 0.999)
    ssnr = f / (1 - f)
    ssnr[0] = ssnr[1] if ssnr.numel() > 1 else ssnr[0]
    return ssnr


def reconstruct_half_maps(
    halves: list[DeformedBackprojection], weights: Tensor | list[Tensor], wiener_snr: float = 1.0
) -> dict:
    """Half maps regularised with the per-shell ``tau^2`` of their own FSC.

    1. Each half's region maps with the constant Wiener term ``1 / wiener_snr``, blended;
    2. their FSC gives ``SSNR = FSC / (1 - FSC)`` per shell (:func:`half_map_ssnr`);
    3. each half's region maps again with that prior (``weight + mean_w / SSNR`` per shell,
       RELION), blended.

    :param halves: the two halves' sums. :param weights: ``(R, D, D, D)`` partition of unity,
        or one per half set (each half set's own regions).
    :return: ``{"half1", "half2": (D, D, D) float32 CPU, "fsc_prior": (D // 2 + 1,) the FSC of
        step 1, "ssnr": its SSNR}``.
    """
    if isinstance(weights, Tensor):
        weights = [weights] * len(halves)
    every = list(range(halves[0].n_regions))
    return reconstruct_half_maps_in_passes(lambda chunk: halves, [every], lambda h, chunk: weights[h], wiener_snr)


def region_passes(n_regions: int, capacity: int, extra_first: int = 0) -> list[list[int]]:
    """Regions ``0 .. R-1`` split into passes of at most ``capacity`` accumulators per half set,
    the first pass also holding ``extra_first`` others (e.g. the rigid one); one pass when all
    fit. The first pass may hold no region (only the extra ones).

    :raises ValueError: ``capacity < max(1, extra_first)``: not even one pass fits.
    """
    if capacity < max(1, extra_first):
        raise ValueError(f"{capacity} accumulators per half set fit in memory, {max(1, extra_first)} are needed")
    first = min(n_regions, capacity - extra_first)
    rest = list(range(first, n_regions))
    return [list(range(first))] + [rest[i : i + capacity] for i in range(0, len(rest), capacity)]


def reconstruct_half_maps_in_passes(accumulate, passes: list[list[int]], weights, wiener_snr: float = 1.0) -> dict:
    """:func:`reconstruct_half_maps` with at most one pass's regions in memory at once.

    :param accumulate: ``regions -> [half 1, half 2]`` :class:`DeformedBackprojection` holding
        those regions (in that order), e.g. one pass over the data; called once per pass for
        the first step of :func:`reconstruct_half_maps` and again for every non-empty pass but
        the last, whose sums are kept for the second step (one call with a single pass).
    :param passes: :func:`region_passes`. :param weights: ``(half, regions) -> (len(regions),
        D, D, D)`` blending weights of those regions.
    :return: as :func:`reconstruct_half_maps`.
    """
    first: list[Tensor | int] = [0, 0]
    halves = None
    for chunk in passes:
        halves = None  # free the previous pass's sums before accumulating the next
        halves = accumulate(chunk)
        for h in (0, 1):
            if chunk:
                first[h] = first[h] + blend(halves[h].region_maps(wiener_snr), weights(h, chunk))
    curve = fsc(first[0], first[1])
    ssnr = half_map_ssnr(curve)
    maps: list[Tensor | int] = [0, 0]
    todo = [passes[-1]] + [c for c in passes[:-1] if c]  # the last pass's sums are still here
    for i, chunk in enumerate(todo):
        if i > 0:
            halves = None
            halves = accumulate(chunk)
        for h in (0, 1):
            maps[h] = maps[h] + blend(halves[h].region_maps(data_vs_prior=ssnr), weights(h, chunk)).cpu()
    del halves
    return {"half1": maps[0], "half2": maps[1], "fsc_prior": curve.cpu(), "ssnr": ssnr.cpu()}



__all__ = [
    "DeformedBackprojection",
    "Regions",
    "blend",
    "half_map_ssnr",
    "local_rigid_transforms",
    "make_regions",
    "reconstruct_half_maps",
    "reconstruct_half_maps_in_passes",
    "region_passes",
]
