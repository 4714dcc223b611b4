"""Rotations in RELION's convention: ZYZ Euler angles, matrices, quaternions, sampling.

All functions are batched over leading dimensions and work for float32/float64 tensors on
any device. Angles are in **degrees** where the name says so (``*_deg``), radians otherwise.
See :mod:`hetero.physics.conventions` for what the matrix means.

Example usage::

    A = euler_to_matrix(torch.tensor([[30.0, 60.0, -10.0]]))   # (1, 3, 3)
    euler = matrix_to_euler(A)                                # back to (rot, tilt, psi)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _rz_passive(angle_rad: Tensor) -> Tensor:
    c, s = torch.cos(angle_rad), torch.sin(angle_rad)
    o, z = torch.ones_like(c), torch.zeros_like(c)
    return torch.stack(
        [torch.stack([c, s, z], -1), torch.stack([-s, c, z], -1), torch.stack([z, z, o], -1)], -2
    )


def _ry_passive(angle_rad: Tensor) -> Tensor:
    c, s = torch.cos(angle_rad), torch.sin(angle_rad)
    o, z = torch.ones_like(c), torch.zeros_like(c)
    return torch.stack(
        [torch.stack([c, z, -s], -1), torch.stack([z, o, z], -1), torch.stack([s, z, c], -1)], -2
    )


def euler_to_matrix(euler_deg: Tensor) -> Tensor:
    """RELION ``Euler_angles2matrix``: ``A = Rz(psi) Ry(tilt) Rz(rot)``.

    :param euler_deg: ``(..., 3)`` angles ``(rot, tilt, psi)`` in degrees.
    :return: ``(..., 3, 3)`` rotation matrices mapping volume to image-frame coordinates.
    """
    rad = torch.deg2rad(euler_deg)
    rot, tilt, psi = rad.unbind(-1)
    return _rz_passive(psi) @ _ry_passive(tilt) @ _rz_passive(rot)


def matrix_to_euler(matrix: Tensor, eps: float = 1e-6) -> Tensor:
    """Inverse of :func:`euler_to_matrix` (RELION ``Euler_matrix2angles``).

    Returns tilt in ``[0, 180]`` and rot, psi in ``(-180, 180]``. At the gimbal-lock poles
    (``sin(tilt) <= eps``) rot is set to 0 and the whole in-plane angle goes to psi.

    Near the poles the third row and column of ``A`` only carry ``rot`` and ``psi`` with a
    relative accuracy ``machine_eps / sin(tilt)``, so ``psi`` is taken from the well-conditioned
    sum ``psi + rot`` (tilt < 90) or difference ``psi - rot`` (tilt > 90) read off the upper-left
    2x2 block. The round trip ``euler_to_matrix(matrix_to_euler(A))`` then reproduces ``A`` to
    machine precision (up to ``eps`` right at the poles) also in float32.

    :param matrix: ``(..., 3, 3)`` rotation matrices.
    :return: ``(..., 3)`` angles ``(rot, tilt, psi)`` in degrees.
    """
    a = matrix
    cos_tilt = a[..., 2, 2].clamp(-1.0, 1.0)
    sin_tilt = torch.sqrt(a[..., 2, 0] ** 2 + a[..., 2, 1] ** 2)
    tilt = torch.atan2(sin_tilt, cos_tilt)
    regular = sin_tilt > eps
    rot = torch.where(regular, torch.atan2(a[..., 2, 1], a[..., 2, 0]), torch.zeros_like(tilt))
    # Upper-left block: a00 + a11 = (1 + cos tilt) cos(psi + rot), a01 - a10 = (1 + cos tilt)
    # sin(psi + rot); a11 - a00 = (1 - cos tilt) cos(psi - rot), a01 + a10 = (1 - cos tilt)
    # sin(psi - rot). Use whichever pair has the larger prefactor.
    psi_plus_rot = torch.atan2(a[..., 0, 1] - a[..., 1, 0], a[..., 0, 0] + a[..., 1, 1])
    psi_minus_rot = torch.atan2(a[..., 0, 1] + a[..., 1, 0], a[..., 1, 1] - a[..., 0, 0])
    psi = torch.where(cos_tilt >= 0, psi_plus_rot - rot, psi_minus_rot + rot)
    psi = torch.atan2(torch.sin(psi), torch.cos(psi))  # wrap to (-pi, pi]
    return torch.rad2deg(torch.stack([rot, tilt, psi], -1))


def viewing_direction(matrix: Tensor) -> Tensor:
    """Projection direction in the volume frame, ``A.T @ (0, 0, 1)`` = third row of ``A``.

    :param matrix: ``(..., 3, 3)``. :return: ``(..., 3)`` unit vectors.
    """
    return matrix[..., 2, :]


def direction_to_angles(direction: Tensor) -> tuple[Tensor, Tensor]:
    """Polar (theta, from +z) and azimuthal (phi) angles in radians of ``(..., 3)`` vectors."""
    d = direction / direction.norm(dim=-1, keepdim=True)
    theta = torch.acos(d[..., 2].clamp(-1.0, 1.0))
    phi = torch.remainder(torch.atan2(d[..., 1], d[..., 0]), 2 * math.pi)
    return theta, phi


def quaternion_to_matrix(quaternion: Tensor) -> Tensor:
    """Unit quaternion ``(w, x, y, z)`` to the *active* rotation matrix it represents.

    Combined with :func:`matrix_to_quaternion` this gives a lossless round trip for any RELION
    matrix ``A`` (we simply store ``A`` as the quaternion of the rotation ``A``).

    :param quaternion: ``(..., 4)``, normalised internally. :return: ``(..., 3, 3)``.
    """
    q = quaternion / quaternion.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def matrix_to_quaternion(matrix: Tensor) -> Tensor:
    """Rotation matrix to unit quaternion ``(w, x, y, z)`` with ``w >= 0`` (Shepperd's method).

    :param matrix: ``(..., 3, 3)``. :return: ``(..., 4)``.
    """
    m = matrix
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    trace = m00 + m11 + m22
    # Four candidate (unnormalised) quaternions; pick the numerically largest for each matrix.
    cands = torch.stack(
        [
            torch.stack([1 + trace, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
            torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m00 - m11 - m22, m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
            torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0], 1 - m00 + m11 - m22, m[..., 1, 2] + m[..., 2, 1]], -1),
            torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1], 1 - m00 - m11 + m22], -1),
        ],
        -2,
    )
    diag = torch.stack([trace, m00, m11, m22], -1)
    best = diag.argmax(-1)
    q = torch.gather(cands, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def random_rotations(
    n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Rotation matrices drawn uniformly (Haar measure) from SO(3).

    Normalised 4-D Gaussian vectors are uniform on S^3, hence uniform quaternions.

    :return: ``(n, 3, 3)`` tensor.
    """
    q = torch.randn(n, 4, generator=generator, dtype=dtype)
    return quaternion_to_matrix(q)


def geodesic_distance_deg(a: Tensor, b: Tensor) -> Tensor:
    """Angle in degrees of the rotation ``a.T @ b`` for ``(..., 3, 3)`` matrices."""
    rel = a.transpose(-1, -2) @ b
    cos = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cos))


def inplane_rotation_matrix(angle_deg: Tensor) -> Tensor:
    """Passive rotation about z, ``Rz(angle)`` in RELION's form. ``(...,)`` -> ``(..., 3, 3)``."""
    return _rz_passive(torch.deg2rad(angle_deg))
