"""class3d building blocks: Fourier points and slices, backprojection against the shared
accumulator, the E-step against direct rendering, the M-step's prior scaling, membership."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from hetero.models.class3d.backprojection import insertion_data, scatter
from hetero.models.class3d.estep import ExpectationState, batch_spectra, expectation, significant
from hetero.models.class3d.membership import build_membership, leave_one_group_out, random_classes
from hetero.models.class3d.mstep import (
    current_radius,
    half_set_fsc,
    power_data_vs_prior,
    regularised_reconstruct,
    shell_power,
    whole_map_ssnr,
)
from hetero.models.class3d.points import HalfPlanePoints, gather_points, point_corners
from hetero.models.components.renderer import Renderer, recenter_images
from hetero.physics.ctf import CTF_COLUMNS, ctf_table_compute
from hetero.physics.fourier import fft2_centered
from hetero.physics.masks import circular_mask
from hetero.physics.projection import volume_rfft
from hetero.physics.reconstruction import BackprojectionAccumulator
from hetero.physics.rotations import random_rotations


def ctf_rows(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    du = 10000 + 10000 * torch.rand(n, generator=g, dtype=torch.float64)
    cols = dict(defocus_u_angstrom=du, defocus_v_angstrom=du - 300, defocus_angle_deg=torch.full((n,), 20.0),
                voltage_kv=torch.full((n,), 300.0), spherical_aberration_mm=torch.full((n,), 2.7),
                amplitude_contrast=torch.full((n,), 0.1), phase_shift_deg=torch.zeros(n),
                b_factor=torch.zeros(n), scale=torch.ones(n))
    return torch.stack([cols[c].double() for c in CTF_COLUMNS], -1)


def test_half_plane_points_hold_one_of_each_hermitian_pair():
    d = 16
    pts = HalfPlanePoints(d)
    k = pts.coords.long()
    keys = {(int(x), int(y)) for x, y in k}
    assert (0, 0) in keys
    for x, y in keys - {(0, 0)}:
        assert (-x, -y) not in keys
    # with their mirrors they cover every pixel whose mirror is in the grid, up to Nyquist
    a = torch.arange(d) - d // 2
    full = {(int(x), int(y)) for y in a for x in a if -d // 2 < x and -d // 2 < y and round(math.hypot(x, y)) <= d // 2}
    assert keys | {(-x, -y) for x, y in keys} == full
    assert torch.all(pts.shell[1:] >= pts.shell[:-1])           # sorted by radius
    assert pts.count_within(3) == int((pts.shell <= 3).sum())
    assert float(pts.npix.sum()) == len(pts)


def test_point_slices_equal_the_renderers_fourier_slices():
    d, n_maps, n_poses = 16, 3, 5
    vols = torch.randn(n_maps, d, d, d, generator=torch.Generator().manual_seed(0))
    rot = random_rotations(n_poses, generator=torch.Generator().manual_seed(1)).float()
    want = Renderer(d, d, "fourier", 2).project_spectra(vols, rot[None].expand(n_maps, -1, -1, -1))
    pts = HalfPlanePoints(d)
    spectra = volume_rfft(vols, 2)
    idx, w, conj = point_corners(rot, pts.coords, spectra.shape[-3], 2.0)
    offsets = (torch.arange(n_maps) * spectra[0].numel())[None].expand(n_poses, -1)
    got = gather_points(spectra.reshape(-1), offsets, idx, w, conj)           # (poses, maps, M)
    want = pts.take(want).permute(1, 0, 2)
    assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()))


def test_batched_insertion_equals_the_accumulators_add():
    """K = 1, unit weights: the same numerator and weights as BackprojectionAccumulator.add."""
    d, n = 12, 7
    g = torch.Generator().manual_seed(3)
    images = torch.randn(n, d, d, generator=g, dtype=torch.float64)
    rot = random_rotations(n, generator=g)
    shifts = torch.randn(n, 2, generator=g, dtype=torch.float64)
    ref = BackprojectionAccumulator(d, 2)
    ctf = ctf_table_compute(ctf_rows(n), ref.ctf_size, torch.full((n,), 4.0, dtype=torch.float64))
    ref.add(images, rot, shifts, ctf)
    acc = BackprojectionAccumulator(d, 2)
    data = insertion_data(acc, images, rot, shifts, ctf, r_max=None)
    num, wgt = acc.numerator[None].clone(), acc.weight[None].clone()
    scatter(data, num, wgt, torch.arange(n), torch.zeros(n, dtype=torch.long), torch.ones(n))
    assert torch.allclose(num[0], ref.numerator, atol=1e-9)
    assert torch.allclose(wgt[0], ref.weight, atol=1e-9)
    # a posterior weight g scales both sums
    num2, wgt2 = torch.zeros_like(num), torch.zeros_like(wgt)
    scatter(data, num2, wgt2, torch.arange(n), torch.zeros(n, dtype=torch.long), torch.full((n,), 0.25))
    assert torch.allclose(num2, 0.25 * num, atol=1e-9) and torch.allclose(wgt2, 0.25 * wgt, atol=1e-9)


def _tiny_state(maps: torch.Tensor, sigma2: torch.Tensor, prior: torch.Tensor, radius: int, pts, pad=2):
    u, k, d = maps.shape[:3]
    spectra = volume_rfft(maps.reshape(u * k, d, d, d), pad)
    m = pts.count_within(radius)
    shell = pts.shell[:m]
    inv = (1.0 / sigma2[:, shell]).float()
    return ExpectationState(spectra.reshape(-1), spectra[0].numel(), k, inv, torch.ones(u, m, dtype=torch.bool),
                            torch.log(prior).float(), torch.log(2 * math.pi * sigma2[:, shell]).sum(1), shell,
                            d // 2 + 1), m


def test_expectation_equals_direct_rendering_and_bayes():
    """diff2 = sum |X - CTF P V|^2 / (2 sigma2) over the half plane, with X the recentred, masked
    image; posteriors are the normalised prior-weighted likelihoods."""
    d, n, k = 16, 4, 3
    g = torch.Generator().manual_seed(5)
    maps = torch.randn(1, k, d, d, d, generator=g)
    rot = random_rotations(n, generator=g).float()
    apix = torch.full((n,), 5.0)
    ctf_table = ctf_rows(n).float()
    batch = {"image": torch.randn(n, d, d, generator=g), "rotation": rot, "origin_px": torch.randn(n, 2, generator=g),
             "ctf": ctf_table, "apix": apix, "index": torch.arange(n)}
    pts = HalfPlanePoints(d)
    sigma2 = (1.0 + torch.rand(1, d // 2 + 1, generator=g, dtype=torch.float64)) * 50
    prior = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    st, m = _tiny_state(maps, sigma2, prior, d // 2, pts)
    mask = circular_mask(d, d / 2 - 2, 2)
    bs = batch_spectra(batch, pts, m, mask, 2 * d, 2.0, use_ctf=True)
    out = expectation(bs, torch.arange(n), torch.zeros(n, dtype=torch.long), st)
    x = pts.take(fft2_centered(recenter_images(batch["image"], batch["origin_px"]) * mask), m)
    ctf = pts.take(ctf_table_compute(ctf_table, d, apix), m)
    proj = Renderer(d, d, "fourier", 2).project_spectra(maps[0], rot[None].expand(k, -1, -1, -1))
    proj = pts.take(proj, m).permute(1, 0, 2)                                   # (n, k, m)
    direct = 0.5 * ((x[:, None] - ctf[:, None] * proj).abs() ** 2 / sigma2[0, pts.shell[:m]]).sum(-1)
    assert torch.allclose(out["diff2"].double(), direct, rtol=1e-4)
    logits = torch.log(prior) - direct
    assert torch.allclose(out["posterior"].double(), torch.softmax(logits, -1), atol=1e-4)
    norm = torch.log(2 * math.pi * sigma2[0, pts.shell[:m]]).sum()
    assert torch.allclose(out["loglik"], torch.logsumexp(logits, -1) - norm, rtol=1e-5)


def test_significant_keeps_the_smallest_set_reaching_the_fraction():
    post = torch.tensor([[0.9, 0.0995, 0.0005], [0.5, 0.3, 0.2]])
    kept = significant(post, 0.999)
    assert torch.equal(kept, torch.tensor([[0.9, 0.0995, 0.0], [0.5, 0.3, 0.2]]))


def _half_accumulators(d: int, n: int, noise: float, seed: int = 0):
    """Two half-set accumulators of projections of one random map plus white noise."""
    g = torch.Generator().manual_seed(seed)
    vol = torch.randn(d, d, d, generator=g, dtype=torch.float64)
    halves = []
    for _ in range(2):
        rot = random_rotations(n, generator=g)
        clean = Renderer(d, d, "fourier", 2).project(vol.float(), rot.float()).double()
        acc = BackprojectionAccumulator(d, 2)
        acc.add(clean + noise * torch.randn(n, d, d, generator=g, dtype=torch.float64), rot)
        halves.append(acc)
    full = copy.copy(halves[0])
    full.numerator = halves[0].numerator + halves[1].numerator
    full.weight = halves[0].weight + halves[1].weight
    return halves, full


def test_half_set_fsc_measures_the_signal():
    d = 12
    (h1, h2), _ = _half_accumulators(d, 80, noise=0.0)
    assert torch.all(half_set_fsc(h1, h2, d // 2)[1 : d // 2] > 0.93)   # interpolation limits it
    (h1, h2), _ = _half_accumulators(d, 80, noise=50.0)
    fsc = half_set_fsc(h1, h2, d // 2)
    assert float(fsc[0]) == 1.0 and float(fsc[1:].abs().max()) < 0.5
    assert torch.all(half_set_fsc(h1, h2, 3)[4:] == 0)
    ssnr = whole_map_ssnr(torch.tensor([0.0, 0.5, 0.999999], dtype=torch.float64))
    assert float(ssnr[0]) == pytest.approx(math.sqrt(0.002 / 1.001) / (1 - math.sqrt(0.002 / 1.001)))
    assert float(ssnr[1]) == pytest.approx(math.sqrt(2 / 3) / (1 - math.sqrt(2 / 3)))
    assert float(ssnr[2]) == pytest.approx(999.0)


def test_regularised_reconstruction_is_the_fsc_wiener_filter():
    """V = num / (w + mean_w / (T SSNR)); data_vs_prior = T SSNR; T -> infinity is the plain ratio."""
    d = 12
    (h1, h2), full = _half_accumulators(d, 60, noise=3.0, seed=1)
    fsc = half_set_fsc(h1, h2, d // 2)
    plain, none = regularised_reconstruct(full, fsc, 1.0, d // 2, do_map=False)
    assert none is None and torch.allclose(plain, full.reconstruct().float(), atol=1e-5)
    big_t, dvp = regularised_reconstruct(full, fsc, 1e12, d // 2)
    assert torch.allclose(big_t, plain, atol=1e-4 * float(plain.abs().max()))
    _, dvp4 = regularised_reconstruct(full, fsc, 4.0, d // 2)
    assert torch.allclose(dvp4, 4.0 * whole_map_ssnr(fsc) * (torch.arange(d // 2 + 1) <= d // 2))
    # the Wiener filter shrinks the noisier shells more
    low_t, _ = regularised_reconstruct(full, fsc, 0.1, d // 2)
    ratio = shell_power(low_t)[1 : d // 2] / shell_power(plain)[1 : d // 2]
    assert torch.all(ratio < 1) and float(ratio[-1]) < float(ratio[0])
    # data beyond r_max are not used (what remains there is the real-space crop's leakage)
    low, _ = regularised_reconstruct(full, fsc, 1e12, 3)
    assert torch.all(shell_power(low)[5:] < 0.1 * shell_power(plain)[5:])


def test_power_data_vs_prior_is_relions_per_voxel_snr():
    """data_vs_prior = T tau2 / sigma2 x images per D-grid voxel of the shell, on any padded grid:
    N images through a shell of radius s put 2 pi s samples each on its 4 pi s^2 voxels, N / 2s
    per voxel (RELION's oversampling correction pad^3 makes pad 2 agree with pad 1); shells
    without a noise estimate or beyond r_max are 0; the prior then is the Wiener filter."""
    d, n = 16, 400
    rot = random_rotations(n, generator=torch.Generator().manual_seed(3))
    images = torch.randn(n, d, d, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    tau2 = torch.full((d // 2 + 1,), 2.0, dtype=torch.float64)
    sigma2 = torch.full((d // 2 + 1,), 8.0, dtype=torch.float64)
    dvps = []
    for pad in (1, 2):
        acc = BackprojectionAccumulator(d, pad)
        acc.add(images, rot)
        dvps.append(power_data_vs_prior(acc, tau2, sigma2, 4.0, d // 2))
    s = torch.arange(3, d // 2, dtype=torch.float64)
    expected = 4.0 * 2.0 / 8.0 * n / (2 * s)
    assert torch.allclose(dvps[0][3 : d // 2], expected, rtol=0.15)
    assert torch.allclose(dvps[1][3 : d // 2], dvps[0][3 : d // 2], rtol=0.15)
    sigma2[5] = 0
    assert float(power_data_vs_prior(acc, tau2, sigma2, 4.0, 6)[5]) == 0.0
    assert torch.all(power_data_vs_prior(acc, tau2, sigma2, 4.0, 6)[7:] == 0)
    # a prior given as data_vs_prior is used as is (fsc ignored): T -> 0 shrinks the map to ~0
    vol, out = regularised_reconstruct(acc, None, 4.0, d // 2, data_vs_prior=dvps[1] * 1e-9)
    plain, _ = regularised_reconstruct(acc, None, 4.0, d // 2, do_map=False)
    assert float(vol.abs().max()) < 1e-2 * float(plain.abs().max())
    assert torch.all(out[1 : d // 2 + 1] == 1e-3)      # floored as RELION does for tau2 = 0


def test_current_radius_follows_data_vs_prior():
    dvp = torch.tensor([[50.0, 20, 8, 3, 1.5, 0.8, 0.5, 0.1, 0.1], [50, 30, 10, 5, 2, 1.2, 1.1, 0.9, 0.1]])
    assert current_radius(dvp, torch.tensor([0.5, 0.5]), 16, incr_size=2, minres_map=1) == 8
    assert current_radius(dvp, torch.tensor([1.0, 0.0]), 16, incr_size=2, minres_map=1) == 6
    assert current_radius(dvp, torch.tensor([1.0, 0.0]), 16, incr_size=2, minres_map=5) == 7
    assert current_radius(dvp, torch.tensor([0.5, 0.5]), 16, incr_size=10, minres_map=1) == 8  # Nyquist


def test_membership_forms_and_errors(tmp_path):
    assert build_membership(5, 3).shape == (5, 3) and bool(build_membership(5, 3).all())
    m = build_membership(6, subsets=[np.array([0, 2, 4]), np.array([1, 2])])
    assert m.tolist() == [[True, False], [False, True], [True, True], [False, False], [True, False],
                          [False, False]]
    np.save(tmp_path / "m.npy", m.numpy())
    assert torch.equal(build_membership(6, subsets=str(tmp_path / "m.npy")), m)
    np.savez(tmp_path / "s.npz", a=np.array([0, 2, 4]), b=np.array([1, 2]))
    assert torch.equal(build_membership(6, 2, subsets=str(tmp_path / "s.npz")), m)
    with pytest.raises(ValueError, match="indices must lie"):
        build_membership(6, subsets=[np.array([0, 6])])
    with pytest.raises(ValueError, match="repeated"):
        build_membership(6, subsets=[np.array([1, 1])])
    with pytest.raises(ValueError, match="n_replicates=3"):
        build_membership(6, 3, subsets=[np.array([1]), np.array([2])])
    with pytest.raises(ValueError, match="empty"):
        build_membership(6, subsets=np.zeros((6, 2), dtype=bool))
    with pytest.raises(FileNotFoundError):
        build_membership(6, subsets=str(tmp_path / "missing.npy"))


def test_leave_one_group_out_puts_each_particle_in_m_subsets():
    m = leave_one_group_out(1003, 4, seed=1)
    assert m.shape == (1003, 4)
    assert torch.all(m.sum(1) == 3)
    sizes = (~m).sum(0)
    assert int(sizes.max() - sizes.min()) <= 1


def test_random_classes_depend_only_on_seed_and_index():
    idx = torch.arange(10000)
    a = random_classes(idx, 7, 5)
    assert torch.equal(a[torch.tensor([3, 500, 9999])], random_classes(torch.tensor([3, 500, 9999]), 7, 5))
    assert not torch.equal(a, random_classes(idx, 8, 5))
    counts = torch.bincount(a, minlength=5).float()
    assert float(counts.min()) > 0.9 * 2000


def test_class_resolution_is_relions_ssnr_estimate_or_the_half_set_fsc():
    """RELION Class3D's rlnEstimatedResolution: the last shell before data_vs_prior first drops
    below 1 (within the current size); the half-set option reads the FSC = 0.143 crossing."""
    from hetero.models.class3d.iteration import Settings, class_resolution

    cfg = Settings(box_size=32, apix=2.0, n_classes=2)
    dvp = torch.tensor([0.0, 50, 20, 9, 4, 2, 1.5, 0.8, 3, 0.1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
    assert class_resolution(cfg, None, dvp, 12) == pytest.approx(32 * 2.0 / 6)   # shell 6: 5.33 Å
    assert class_resolution(cfg, None, dvp, 4) == pytest.approx(32 * 2.0 / 4)    # capped at the current size
    assert math.isnan(class_resolution(cfg, None, None, 12))
    fsc = torch.tensor([1.0, 0.9, 0.8, 0.5, 0.3, 0.2, 0.1, 0.05, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
    half = Settings(box_size=32, apix=2.0, n_classes=2, class_resolution="half_set_fsc")
    assert half.needs_half_set_fsc and not cfg.needs_half_set_fsc
    assert 32 * 2.0 / 6 <= class_resolution(half, fsc, dvp, 12) <= 32 * 2.0 / 5   # crossing between shells 5 and 6
    assert Settings(box_size=32, apix=2.0, n_classes=2, tau2_source="fsc").needs_half_set_fsc


@pytest.mark.parametrize("n_iterations", [0, 1])
def test_fewer_than_two_iterations_are_refused(n_iterations):
    """0 iterations trained nothing and left a run without a checkpoint (exit 0); 1 is only the
    seeding iteration, whose classes are the random seed subsets, and no diagnostic ran."""
    from hetero.models.class3d import Class3D

    with pytest.raises(ValueError, match="n_iterations must be >= 2"):
        Class3D(box_size=16, apix=2.0, n_classes=2, n_iterations=n_iterations, n_particles=10)
    assert Class3D(box_size=16, apix=2.0, n_classes=2, n_iterations=2, n_particles=10).n_iterations == 2
