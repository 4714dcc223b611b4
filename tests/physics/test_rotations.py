"""RELION Euler convention, matrix/Euler/quaternion conversions, uniform sampling, distances.

The contract (``hetero.physics.conventions``): ``A = Rz(psi) Ry(tilt) Rz(rot)`` with passive
elementary matrices; ``A`` maps volume coordinates to image-frame coordinates; the viewing
direction is the third row of ``A``.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from hetero.physics.rotations import (
    direction_to_angles,
    euler_to_matrix,
    geodesic_distance_deg,
    inplane_rotation_matrix,
    matrix_to_euler,
    matrix_to_quaternion,
    quaternion_to_matrix,
    random_rotations,
    viewing_direction,
)

S2, S3, S6 = math.sqrt(2), math.sqrt(3), math.sqrt(6)


def relion_matrix(rot: float, tilt: float, psi: float) -> torch.Tensor:
    """Element-wise transcription of RELION's ``Euler_angles2matrix`` (independent of the
    matrix product in the implementation)."""
    a, b, g = (math.radians(v) for v in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = math.cos(a), math.sin(a), math.cos(b), math.sin(b), math.cos(g), math.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return torch.tensor(
        [
            [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
            [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
            [sc, ss, cb],
        ],
        dtype=torch.float64,
    )


def _random_euler(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    e = torch.rand(n, 3, generator=g, dtype=dtype) * 360 - 180
    e[:, 1] = torch.rand(n, generator=g, dtype=dtype) * 180
    return e


# ------------------------------------------------------------------------------------------
# Euler -> matrix: explicit values
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("angles", "expected"),
    [
        # Pure rot = 90: passive Rz, a volume point on +x appears at image (0, -1).
        ((90.0, 0.0, 0.0), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]]),
        # Pure tilt = 90: passive Ry, the viewing direction becomes +x.
        ((0.0, 90.0, 0.0), [[0, 0, -1], [0, 1, 0], [1, 0, 0]]),
        # rot = tilt = 90: Ry(90) Rz(90), viewing direction +y.
        ((90.0, 90.0, 0.0), [[0, 0, -1], [-1, 0, 0], [0, 1, 0]]),
        # (30, 60, 90), derived by hand from the passive product.
        ((30.0, 60.0, 90.0), [[-1 / 2, S3 / 2, 0], [-S3 / 4, -1 / 4, S3 / 2], [3 / 4, S3 / 4, 1 / 2]]),
        # (30, 60, -45), derived by hand.
        (
            (30.0, 60.0, -45.0),
            [
                [S6 / 8 + S2 / 4, S2 / 8 - S6 / 4, -S6 / 4],
                [S6 / 8 - S2 / 4, S2 / 8 + S6 / 4, -S6 / 4],
                [3 / 4, S3 / 4, 1 / 2],
            ],
        ),
    ],
)
def test_euler_to_matrix_explicit_values(angles, expected):
    expected = torch.tensor(expected, dtype=torch.float64)
    got = euler_to_matrix(torch.tensor(angles, dtype=torch.float64))
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(relion_matrix(*angles), expected, atol=1e-12, rtol=0)


def test_euler_to_matrix_matches_relion_elementwise_formula():
    e = _random_euler(50, seed=1)
    got = euler_to_matrix(e)
    expected = torch.stack([relion_matrix(*row.tolist()) for row in e])
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_euler_to_matrix_is_batched_over_leading_dims():
    e = _random_euler(12, seed=2).reshape(3, 4, 3)
    a = euler_to_matrix(e)
    assert a.shape == (3, 4, 3, 3)
    torch.testing.assert_close(a[1, 2], euler_to_matrix(e[1, 2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matrices_are_proper_rotations(dtype):
    a = euler_to_matrix(_random_euler(500, seed=3, dtype=dtype))
    eye = torch.eye(3, dtype=dtype).expand_as(a)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(a @ a.transpose(-1, -2), eye, atol=tol, rtol=0)
    torch.testing.assert_close(torch.linalg.det(a), torch.ones(500, dtype=dtype), atol=tol, rtol=0)


def test_inplane_rotation_matrix_is_psi_only_euler():
    ang = torch.tensor([-170.0, -30.0, 0.0, 45.0, 180.0], dtype=torch.float64)
    e = torch.stack([torch.zeros_like(ang), torch.zeros_like(ang), ang], -1)
    torch.testing.assert_close(inplane_rotation_matrix(ang), euler_to_matrix(e))


# ------------------------------------------------------------------------------------------
# matrix -> Euler
# ------------------------------------------------------------------------------------------


def test_matrix_to_euler_recovers_regular_angles_exactly():
    e = _random_euler(1000, seed=4)
    e[:, 1] = e[:, 1].clamp(1.0, 179.0)  # away from the poles the angles are unique
    back = matrix_to_euler(euler_to_matrix(e))
    torch.testing.assert_close(back, e, atol=1e-9, rtol=0)


def test_matrix_to_euler_ranges():
    back = matrix_to_euler(random_rotations(2000, generator=torch.Generator().manual_seed(5)))
    rot, tilt, psi = back.unbind(-1)
    assert tilt.min() >= 0 and tilt.max() <= 180
    for ang in (rot, psi):
        assert ang.min() > -180 - 1e-9 and ang.max() <= 180 + 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tilt", [0.0, 1e-4, 1e-3, 0.01, 0.3, 45.0, 90.0, 135.0, 179.7, 179.99, 180.0])
def test_euler_round_trip_via_matrices_including_poles(tilt, dtype):
    e = _random_euler(300, seed=6, dtype=dtype)
    e[:, 1] = tilt
    a = euler_to_matrix(e)
    back = matrix_to_euler(a)
    tol = 5e-6 if dtype == torch.float32 else 1e-6  # up to eps=1e-6 right at the poles
    torch.testing.assert_close(euler_to_matrix(back), a, atol=tol, rtol=0)
    assert torch.all((back[:, 1] - tilt).abs() < 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tilt", [1e-4, 1e-3, 0.01, 0.1, 179.9, 179.999])
def test_matrix_to_euler_is_stable_for_generic_near_pole_matrices(tilt, dtype):
    """Matrices that come out of arithmetic (here ``A R R^T``) carry absolute rounding errors
    in every entry; near the poles the angles must still reproduce the matrix (this failed
    by up to 0.38 in float32 when psi was read off the third column alone)."""
    g = torch.Generator().manual_seed(7)
    e = torch.rand(500, 3, generator=g, dtype=dtype) * 360 - 180
    e[:, 1] = tilt
    r = random_rotations(500, generator=g, dtype=dtype)
    a = (euler_to_matrix(e) @ r) @ r.transpose(-1, -2)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(euler_to_matrix(matrix_to_euler(a)), a, atol=tol, rtol=0)


@pytest.mark.parametrize("tilt", [0.0, 180.0])
def test_exact_poles_put_the_inplane_angle_in_psi(tilt):
    e = torch.tensor([[40.0, tilt, 25.0], [-100.0, tilt, 170.0]], dtype=torch.float64)
    back = matrix_to_euler(euler_to_matrix(e))
    assert torch.all(back[:, 0] == 0)
    assert torch.all(back[:, 1] == tilt)
    # At tilt 0 only rot + psi matters, at tilt 180 only psi - rot.
    combined = e[:, 2] + e[:, 0] if tilt == 0 else e[:, 2] - e[:, 0]
    diff = torch.remainder(back[:, 2] - combined + 180, 360) - 180
    assert diff.abs().max() < 1e-9


# ------------------------------------------------------------------------------------------
# Quaternions
# ------------------------------------------------------------------------------------------


def _special_rotations() -> torch.Tensor:
    """Identity and 180-degree rotations exercise every branch of Shepperd's method."""
    mats = [
        torch.eye(3),
        torch.diag(torch.tensor([1.0, -1.0, -1.0])),
        torch.diag(torch.tensor([-1.0, 1.0, -1.0])),
        torch.diag(torch.tensor([-1.0, -1.0, 1.0])),
        torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]),  # 180 about (1,1,0)
    ]
    return torch.stack(mats).double()


def test_quaternion_round_trip():
    a = torch.cat([random_rotations(1000, generator=torch.Generator().manual_seed(8)), _special_rotations()])
    q = matrix_to_quaternion(a)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(len(a), dtype=a.dtype))
    assert torch.all(q[:, 0] >= 0)
    torch.testing.assert_close(quaternion_to_matrix(q), a, atol=1e-12, rtol=0)


def test_quaternion_sign_ambiguity_and_normalisation():
    g = torch.Generator().manual_seed(9)
    q = torch.randn(200, 4, generator=g, dtype=torch.float64)
    m = quaternion_to_matrix(q)
    torch.testing.assert_close(quaternion_to_matrix(-q), m)
    torch.testing.assert_close(quaternion_to_matrix(3.7 * q), m)
    q_unit = q / q.norm(dim=-1, keepdim=True)
    q_canon = torch.where(q_unit[:, :1] < 0, -q_unit, q_unit)
    torch.testing.assert_close(matrix_to_quaternion(m), q_canon, atol=1e-12, rtol=0)


def test_quaternion_is_active_rotation_and_composes():
    theta = math.radians(30.0)
    q = torch.tensor([math.cos(theta / 2), 0.0, 0.0, math.sin(theta / 2)], dtype=torch.float64)
    c, s = math.cos(theta), math.sin(theta)
    expected = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(quaternion_to_matrix(q), expected)

    g = torch.Generator().manual_seed(10)
    q1, q2 = torch.randn(2, 50, 4, generator=g, dtype=torch.float64)
    w1, v1 = q1[:, :1], q1[:, 1:]
    w2, v2 = q2[:, :1], q2[:, 1:]
    prod = torch.cat([w1 * w2 - (v1 * v2).sum(-1, keepdim=True), w1 * v2 + w2 * v1 + torch.cross(v1, v2, dim=-1)], -1)
    torch.testing.assert_close(quaternion_to_matrix(prod), quaternion_to_matrix(q1) @ quaternion_to_matrix(q2))


# ------------------------------------------------------------------------------------------
# Uniform sampling
# ------------------------------------------------------------------------------------------


def test_random_rotations_are_uniform():
    n = 20000
    a = random_rotations(n, generator=torch.Generator().manual_seed(11))
    assert a.shape == (n, 3, 3) and a.dtype == torch.float64
    torch.testing.assert_close(a @ a.transpose(-1, -2), torch.eye(3, dtype=a.dtype).expand_as(a))
    torch.testing.assert_close(torch.linalg.det(a), torch.ones(n, dtype=a.dtype))
    # Haar measure: E[A] = 0 (each entry has standard deviation 1/sqrt(3)).
    assert a.mean(0).abs().max() < 0.02
    # Archimedes: the z of a uniform direction is uniform on [-1, 1]; so is every other axis.
    for axis in range(3):
        d = viewing_direction(a)[:, axis].numpy()
        assert stats.kstest(d, "uniform", args=(-1.0, 2.0)).pvalue > 1e-3
    # psi and rot are uniform too.
    e = matrix_to_euler(a)
    for col in (0, 2):
        assert stats.kstest(e[:, col].numpy(), "uniform", args=(-180.0, 360.0)).pvalue > 1e-3


def test_uniform_euler_angles_would_fail_the_ks_test():
    """Sanity check that the KS test above discriminates: uniform tilt is not uniform z."""
    e = _random_euler(20000, seed=12)
    z = viewing_direction(euler_to_matrix(e))[:, 2].numpy()
    assert stats.kstest(z, "uniform", args=(-1.0, 2.0)).pvalue < 1e-6


def test_random_rotations_respects_generator_and_dtype():
    a = random_rotations(5, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    b = random_rotations(5, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    assert a.dtype == torch.float32
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# Viewing direction
# ------------------------------------------------------------------------------------------


def test_viewing_direction_is_third_row_and_spherical_angles():
    e = _random_euler(500, seed=13)
    a = euler_to_matrix(e)
    d = viewing_direction(a)
    torch.testing.assert_close(d, a[:, 2, :])
    ez = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(d, a.transpose(-1, -2) @ ez)
    rot, tilt = torch.deg2rad(e[:, 0]), torch.deg2rad(e[:, 1])
    expected = torch.stack([tilt.sin() * rot.cos(), tilt.sin() * rot.sin(), tilt.cos()], -1)
    torch.testing.assert_close(d, expected)
    theta, phi = direction_to_angles(d)
    torch.testing.assert_close(theta, tilt)
    torch.testing.assert_close(torch.cos(phi), torch.cos(rot))
    torch.testing.assert_close(torch.sin(phi), torch.sin(rot))


def test_viewing_direction_is_the_projection_axis():
    """A volume point along the viewing direction lands on the image centre (x = y = 0)."""
    a = euler_to_matrix(_random_euler(100, seed=14))
    image_xyz = a @ viewing_direction(a)[..., None]
    torch.testing.assert_close(image_xyz[:, :2, 0], torch.zeros(100, 2, dtype=a.dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close(image_xyz[:, 2, 0], torch.ones(100, dtype=a.dtype))


# ------------------------------------------------------------------------------------------
# Geodesic distance
# ------------------------------------------------------------------------------------------


def test_geodesic_distance_properties():
    g = torch.Generator().manual_seed(15)
    a, b, c = random_rotations(300, generator=g), random_rotations(300, generator=g), random_rotations(300, generator=g)
    dab = geodesic_distance_deg(a, b)
    assert torch.all(geodesic_distance_deg(a, a) < 1e-5)
    torch.testing.assert_close(dab, geodesic_distance_deg(b, a))
    assert torch.all((dab >= 0) & (dab <= 180))
    assert torch.all(dab <= geodesic_distance_deg(a, c) + geodesic_distance_deg(c, b) + 1e-6)
    r = random_rotations(300, generator=g)
    torch.testing.assert_close(geodesic_distance_deg(r @ a, r @ b), dab)
    torch.testing.assert_close(geodesic_distance_deg(a @ r, b @ r), dab)


@pytest.mark.parametrize("angle", [0.5, 10.0, 90.0, 135.0, 179.0])
def test_geodesic_distance_equals_rotation_angle(angle):
    a = random_rotations(50, generator=torch.Generator().manual_seed(16))
    # The same in-plane (psi) increment for every pose, and a tilt increment at rot = psi = 0.
    inplane = inplane_rotation_matrix(torch.full((50,), angle, dtype=torch.float64))
    torch.testing.assert_close(geodesic_distance_deg(a, inplane @ a), torch.full((50,), angle, dtype=torch.float64))
    tilt = euler_to_matrix(torch.tensor([0.0, angle, 0.0], dtype=torch.float64))
    torch.testing.assert_close(geodesic_distance_deg(tilt, torch.eye(3, dtype=torch.float64)), torch.tensor(angle, dtype=torch.float64))


def test_geodesic_distance_half_turn():
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
    assert geodesic_distance_deg(torch.eye(3, dtype=torch.float64), flip).item() == pytest.approx(180.0)
