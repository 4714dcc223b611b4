"""Projection at RELION poses: analytic blob positions, real vs Fourier, exact adjoints, the
forward model ``render`` and conformance with cryoDRGN's toy projections.

Contract: a volume point ``r_vol = (x, y, z)`` (array order ``[z, y, x]``, origin at index
``D // 2``) appears in the projection at ``(A @ r_vol)[:2]``; projections integrate along z
and preserve the integral.
"""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from hetero.physics.ctf import compute_ctf
from hetero.physics.fourier import fft2_centered, ifft2_centered, shift_images
from hetero.physics.projection import (
    insert_slices,
    project_fourier,
    project_real,
    render,
    rotate_volume,
    slice_spectra,
    slice_spectrum,
    volume_rfft,
    volume_spectrum,
)
from hetero.physics.rotations import euler_to_matrix, random_rotations

POSES = [  # (rot, tilt, psi): none of them symmetric, A != A.T
    (30.0, 60.0, -10.0),
    (-120.0, 35.0, 75.0),
    (200.0, 110.0, 160.0),
    (45.0, 150.0, -100.0),
    (10.0, 90.0, 90.0),
]
R0 = (5.0, -3.0, 2.5)  # off-centre blob position (x, y, z) in pixels


def _centroid(images: torch.Tensor, radius: float | None = None) -> torch.Tensor:
    """``(B, 2)`` intensity centroids ``(x, y)`` relative to the centre pixel ``D // 2``;
    with ``radius``, only over the pixels within ``radius`` of each image's brightest pixel."""
    size = images.shape[-1]
    axis = torch.arange(size, dtype=images.dtype) - size // 2
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    weights = images
    if radius is not None:
        peak = images.flatten(-2).argmax(-1)
        px, py = axis[peak % size], axis[peak // size]
        near = (xx - px[:, None, None]) ** 2 + (yy - py[:, None, None]) ** 2 <= radius**2
        weights = images * near
    total = weights.sum((-2, -1))
    return torch.stack([(weights * xx).sum((-2, -1)) / total, (weights * yy).sum((-2, -1)) / total], -1)


def _corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean((-2, -1), keepdim=True)
    b = b - b.mean((-2, -1), keepdim=True)
    return (a * b).sum((-2, -1)) / (a.norm(dim=(-2, -1)) * b.norm(dim=(-2, -1)))


@pytest.fixture(scope="module")
def poses() -> torch.Tensor:
    return euler_to_matrix(torch.tensor(POSES, dtype=torch.float64))


@pytest.mark.parametrize("projector", ["real", "fourier"])
def test_gaussian_blob_projects_to_a_r0(projector, poses, blob_volume):
    size, sigma = 32, 1.5
    vol = blob_volume(size, [R0], [sigma])
    proj = project_real(vol, poses) if projector == "real" else project_fourier(vol, poses)
    assert proj.shape == (len(POSES), size, size)
    r0 = torch.tensor(R0, dtype=torch.float64)
    expected = (poses @ r0)[:, :2]
    wrong = (poses.transpose(-1, -2) @ r0)[:, :2]  # the transposed convention
    assert torch.all((expected - wrong).norm(dim=-1) > 1.5)  # the test can tell them apart
    # Peak position: centroid of the blob (pixels within 5 px of the brightest one).
    assert (_centroid(proj, radius=5.0) - expected).norm(dim=-1).max() < 0.2
    # Brightest pixel is the one nearest to the expected centre.
    peak = proj.flatten(-2).argmax(-1)
    peak_xy = torch.stack([peak % size, peak // size], -1) - size // 2
    assert torch.all((peak_xy - expected).abs() <= 0.5 + 1e-9)
    # Integral preserved: sum of the projection equals the sum of the volume. The Fourier
    # projector's sinc^2 pre-correction (as in RELION's projector) biases the exactly sampled
    # DC term by 1 / sinc^2(r / P) averaged over the map: ~4 % here for a blob 6 px off-centre.
    tol = 1e-2 if projector == "real" else 5e-2
    torch.testing.assert_close(proj.sum((-2, -1)), vol.sum().expand(len(POSES)), rtol=tol, atol=0)
    if projector == "real":  # and no far-field artefacts: the global centroid is right too
        assert (_centroid(proj) - expected).norm(dim=-1).max() < 0.05
    # And it is the analytic 2-D Gaussian of the same sigma (line integral sqrt(2 pi) sigma).
    axis = torch.arange(size, dtype=torch.float64) - size // 2
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    d2 = (xx - expected[:, 0, None, None]) ** 2 + (yy - expected[:, 1, None, None]) ** 2
    analytic = math.sqrt(2 * math.pi) * sigma * torch.exp(-d2 / (2 * sigma**2))
    assert _corr(proj, analytic).min() > 0.995


def test_array_order_is_z_y_x():
    """Identity pose: a voxel at [z, y, x] shows up at image [y, x]."""
    vol = torch.zeros(16, 16, 16, dtype=torch.float64)
    vol[3, 11, 5] = 2.0
    proj = project_real(vol, torch.eye(3, dtype=torch.float64)[None])
    assert proj[0, 11, 5].item() == pytest.approx(2.0)
    assert proj.sum().item() == pytest.approx(2.0)


def test_rotate_volume_identity_and_quarter_turn(blob_volume):
    # Odd box: the grid -12 .. 12 maps onto itself under quarter turns (an even box would lose
    # the row at -D/2, which has no +D/2 partner).
    vol = blob_volume(25, [(5.0, -2.0, 3.0)], [1.5])
    eye = torch.eye(3, dtype=torch.float64)[None]
    torch.testing.assert_close(rotate_volume(vol, eye)[0], vol, atol=1e-10, rtol=0)
    # rot = 90: A maps (x, y, z) -> (y, -x, z); V'(r) = V(A.T r) has its blob at A r0.
    a = euler_to_matrix(torch.tensor([[90.0, 0.0, 0.0]], dtype=torch.float64))
    moved = blob_volume(25, [(-2.0, -5.0, 3.0)], [1.5])
    torch.testing.assert_close(rotate_volume(vol, a)[0], moved, atol=1e-10, rtol=0)
    # Batched volumes: one per pose.
    vols = torch.stack([vol, moved])
    out = rotate_volume(vols, torch.cat([eye, eye]))
    torch.testing.assert_close(out, vols, atol=1e-10, rtol=0)


def test_project_real_resampling_preserves_line_integrals(blob_volume):
    vol = blob_volume(32, [(2.0, 1.0, -3.0), (-4.0, 3.0, 1.0)], [2.5, 3.0])
    a = random_rotations(3, generator=torch.Generator().manual_seed(0))
    small = project_real(vol, a, out_size=16, scale=2.0)
    assert small.shape == (3, 16, 16)
    # Each output pixel covers 2 x 2 input pixels: the total density is the sum times 4.
    torch.testing.assert_close(small.sum((-2, -1)) * 4, vol.sum().expand(3), rtol=2e-2, atol=0)
    full = project_real(vol, a)
    assert _corr(small, full[..., ::2, ::2]).min() > 0.99


def test_real_and_fourier_projectors_agree(blob_volume):
    g = torch.Generator().manual_seed(1)
    # Content within radius ~14 < 16 so that no density rotates out of the box.
    centres = ((torch.rand(6, 3, generator=g) - 0.5) * 8).tolist()
    sigmas = (1.5 + torch.rand(6, generator=g)).tolist()
    amps = (0.5 + torch.rand(6, generator=g)).tolist()
    vol = blob_volume(32, centres, sigmas, amps, dtype=torch.float32)
    a = random_rotations(20, generator=g, dtype=torch.float32)
    real, four = project_real(vol, a), project_fourier(vol, a, pad_factor=2)
    assert real.dtype == four.dtype == torch.float32
    assert _corr(real, four).min() > 0.999
    torch.testing.assert_close(real.sum((-2, -1)), four.sum((-2, -1)), rtol=5e-2, atol=0)


def test_batched_half_spectrum_slicer_equals_centred_reference(blob_volume):
    """The fast path (rfftn, periodic indices, Hermitian mirror, one gather) reads exactly the
    values the centred reference path interpolates, for several volumes and poses each."""
    g = torch.Generator().manual_seed(2)
    vols = torch.stack(
        [blob_volume(16, ((torch.rand(3, 3, generator=g) - 0.5) * 8).tolist(), [1.5] * 3) for _ in range(2)]
    )
    rot = random_rotations(6, generator=g, dtype=torch.float64).reshape(2, 3, 3, 3)
    fast = slice_spectra(volume_rfft(vols, 2), rot, 16, 16)
    assert fast.shape == (2, 3, 16, 16)
    for v in range(2):
        ref = slice_spectrum(volume_spectrum(vols[v], 2), rot[v], 16)
        # The paths differ only in how they drop samples at the very edge of the padded cube:
        # compare within the inscribed circle |k| < D/2 - 1 (all that a model image needs).
        k = torch.arange(16) - 8
        disc = (k[:, None] ** 2 + k[None, :] ** 2) < 7**2
        torch.testing.assert_close(fast[v][:, disc], ref[:, disc], rtol=1e-9, atol=1e-9 * ref.abs().max())


@pytest.mark.parametrize("template", [12, 16, 24])
def test_batched_slicer_resamples_template_onto_image_box(template, blob_volume):
    """A template of side T spanning the same extent as a D = 16 image projects (Fourier path,
    scaled by (D / T)^2) like the real-space projector with scale T / D."""
    d = 16
    vol = blob_volume(template, [(2.0 * template / d, -1.0 * template / d, 0.5)], [1.6 * template / d])
    rot = random_rotations(4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    four = ifft2_centered(slice_spectra(volume_rfft(vol[None], 2), rot[None], d, template)[0]).real
    four = four * (d / template) ** 2
    real = project_real(vol, rot, out_size=d, scale=template / d)
    assert _corr(four, real).min() > 0.99
    torch.testing.assert_close(four.sum((-2, -1)), real.sum((-2, -1)), rtol=6e-2, atol=0)


@pytest.mark.parametrize("cdtype", [torch.complex128, torch.complex64])
def test_insert_slices_is_the_exact_adjoint_of_slice_spectrum(cdtype):
    g = torch.Generator().manual_seed(2)
    rdtype = torch.float64 if cdtype == torch.complex128 else torch.float32
    box, padded, n = 8, 16, 7
    vol = torch.randn(padded, padded, padded, generator=g, dtype=cdtype)
    img = torch.randn(n, box, box, generator=g, dtype=cdtype)
    a = random_rotations(n, generator=g).to(rdtype)
    lhs = (slice_spectrum(vol, a, box) * img.conj()).sum()
    rhs = (vol * insert_slices(img, a, padded).conj()).sum()
    tol = 1e-12 if cdtype == torch.complex128 else 1e-5
    assert abs(lhs - rhs) <= tol * abs(lhs)
    assert abs(lhs) > 1.0  # not trivially zero
    # The weights argument multiplies the slices before insertion.
    w = torch.rand(n, box, box, generator=g, dtype=rdtype)
    torch.testing.assert_close(insert_slices(img, a, padded, weights=w), insert_slices(img * w, a, padded))


def test_slice_spectrum_identity_pose_reads_the_central_plane():
    g = torch.Generator().manual_seed(3)
    spec = torch.randn(16, 16, 16, generator=g, dtype=torch.complex128)
    out = slice_spectrum(spec, torch.eye(3, dtype=torch.float64)[None], 8)
    # box 8 in a 16 grid (pad 2): frequency k lands on index 8 + 2 k of the z = 0 plane.
    torch.testing.assert_close(out[0], spec[8, 0:16:2, 0:16:2])


def test_render_applies_ctf_then_translation(blob_volume):
    # Odd box: no unpaired Nyquist row, so taking the real part between the CTF and the
    # (sub-pixel) translation, as the reference below does, is exact.
    vol = blob_volume(25, [R0, (-3.0, 2.0, -4.0)], [1.5, 2.0], dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    a = random_rotations(4, generator=g, dtype=torch.float32)
    shifts = (torch.rand(4, 2, generator=g) - 0.5) * 6
    proj = project_real(vol, a)
    torch.testing.assert_close(render(vol, a), proj)
    torch.testing.assert_close(render(vol, a, shifts_px=shifts), shift_images(proj, shifts), atol=1e-5, rtol=0)
    ctf = compute_ctf(25, 2.0, torch.full((4,), 15000.0), torch.full((4,), 14000.0), 20.0, 300.0, 2.7, 0.1)
    expected = ifft2_centered(fft2_centered(proj) * ctf).real
    torch.testing.assert_close(render(vol, a, ctf=ctf), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(render(vol, a, shifts_px=shifts, ctf=ctf), shift_images(expected, shifts), atol=1e-5, rtol=0)


def test_render_relion_origin_moves_the_particle_to_centre_minus_origin(poses, blob_volume):
    vol = blob_volume(32, [R0], [1.5])
    origin = torch.tensor([[2.0, -1.5], [0.5, 3.0], [-2.5, -2.0], [1.0, 1.0], [-3.0, 0.0]], dtype=torch.float64)
    images = render(vol, poses, shifts_px=-origin)
    expected = (poses @ torch.tensor(R0, dtype=torch.float64))[:, :2] - origin
    assert (_centroid(images) - expected).norm(dim=-1).max() < 0.2


# ------------------------------------------------------------------------------------------
# Conformance: cryoDRGN's toy projections
# ------------------------------------------------------------------------------------------


def test_restricted_unpickler_refuses_arbitrary_globals(restricted_unpickler):
    with pytest.raises(pickle.UnpicklingError):
        restricted_unpickler(io.BytesIO(pickle.dumps(Path("x")))).load()
    # A classic payload: refused at find_class, before anything could be called.
    with pytest.raises(pickle.UnpicklingError):
        restricted_unpickler(io.BytesIO(b"cos\nsystem\n(S'true'\ntR.")).load()
    ok = pickle.dumps((np.arange(3.0), {"a": [np.float32(1.5)]}))
    arr, dct = restricted_unpickler(io.BytesIO(ok)).load()
    assert np.array_equal(arr, np.arange(3.0)) and dct["a"][0] == np.float32(1.5)


def test_toy_projections_reproduced_with_cryodrgn_rotations(toy_data):
    """cryoDRGN's ``rot`` is RELION's ``A``: projecting the toy volume reproduces the stack."""
    n = 200
    assert toy_data.volume.shape == (30, 30, 30)
    assert toy_data.projections.shape == (1000, 30, 30)
    a = toy_data.rotations[:n]
    ref = toy_data.projections[:n]
    proj = project_real(toy_data.volume, a)
    assert _corr(proj, ref).min() > 0.999
    assert (proj - ref).abs().max() < 1e-3 * ref.abs().max()
    # The transposed rotations do not match (the comparison discriminates).
    assert _corr(project_real(toy_data.volume, a[:50].transpose(-1, -2)), ref[:50]).mean() < 0.9
    # The Fourier projector agrees too (the toy map is sharp, so less tightly).
    assert _corr(project_fourier(toy_data.volume, a[:50]), ref[:50]).min() > 0.95


def test_toy_pickle_shifts_were_not_applied(toy_data):
    n = 100
    a, ref = toy_data.rotations[:n], toy_data.projections[:n]
    origin_px = toy_data.trans[:n] * 30  # cryoDRGN trans is RELION's origin as a box fraction
    assert origin_px.abs().max() > 1.0
    shifted = render(toy_data.volume, a, shifts_px=-origin_px)
    assert _corr(shifted, ref).mean() < 0.95
