"""The polynomial pieces of :class:`hetero.analysis.landscape.Landscape` (private helpers).

Piecewise-linear: one plane per Delaunay triangle. Clough-Tocher: scipy's C1 interpolant as one
cubic per micro-triangle, recovered from scipy's values at 10 interior points per piece.
"""

from __future__ import annotations

import numpy as np

from hetero.analysis.landscape import monomials

# Sample points (affine coordinates) at which each cubic piece is fitted: the cubic lattice of
# the reference triangle pulled towards its centroid, so every sample lies strictly inside.
_LATTICE = np.array([(i / 3, j / 3) for i in range(4) for j in range(4 - i)])
_SAMPLES = 1 / 3 + 0.6 * (_LATTICE - 1 / 3)


def poly_mul(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Product of bivariate polynomials ``(n, 4, 4)`` (coefficient of ``x^i y^j`` at
    ``[i, j]``), truncated to total degree 3."""
    out = np.zeros_like(p)
    for i in range(4):
        for j in range(4 - i):
            for k in range(4 - i - j):
                for m in range(4 - i - j - k):
                    out[:, i + k, j + m] += p[:, i, j] * q[:, k, m]
    return out


def linear_pieces(tri, energies: np.ndarray):
    """One plane per triangle: ``G = G0 + (G1 - G0) u + (G2 - G0) v`` with the triangle's
    affine frame at vertex 0 (exactly barycentric interpolation, as LinearNDInterpolator)."""
    verts = tri.points[tri.simplices]  # (T, 3, 2)
    e = energies[tri.simplices]
    coeffs = np.zeros((len(verts), 10))
    coeffs[:, 0] = e[:, 0]
    coeffs[:, 1] = e[:, 1] - e[:, 0]
    coeffs[:, 2] = e[:, 2] - e[:, 0]
    jac = np.stack([verts[:, 1] - verts[:, 0], verts[:, 2] - verts[:, 0]], axis=2)
    return coeffs, verts[:, 0].copy(), np.linalg.inv(jac)


def cubic_pieces(tri, energies: np.ndarray):
    """The Clough-Tocher interpolant of scipy as explicit cubics, one per micro-triangle.

    scipy's ``CloughTocher2DInterpolator`` (global gradient estimation, centroid split) is a
    cubic polynomial on each of the three micro-triangles ``(centroid, v_{m+1}, v_{m+2})`` of
    every triangle. Each cubic is recovered exactly (to rounding) from scipy's values at 10
    interior points of its micro-triangle, in the micro-triangle's affine frame, where the
    10 x 10 system is the same well-conditioned matrix for every piece.
    """
    from scipy.interpolate import CloughTocher2DInterpolator

    interp = CloughTocher2DInterpolator(tri, energies)
    verts = tri.points[tri.simplices]  # (T, 3, 2)
    centroid = verts.mean(1)
    n_tri = len(verts)
    origin = np.repeat(centroid, 3, axis=0)  # piece 3 t + m
    ax = np.stack([verts[:, (m + 1) % 3] - centroid for m in range(3)], 1).reshape(-1, 2)
    bx = np.stack([verts[:, (m + 2) % 3] - centroid for m in range(3)], 1).reshape(-1, 2)
    jac = np.stack([ax, bx], axis=2)  # (3T, 2, 2): columns are the micro-triangle's edges
    samples = origin[:, None, :] + np.einsum("pij,sj->psi", jac, _SAMPLES)  # (3T, 10, 2)
    values = interp(samples.reshape(-1, 2)).reshape(3 * n_tri, len(_SAMPLES))
    vander = monomials(_SAMPLES[:, 0], _SAMPLES[:, 1])
    coeffs = np.linalg.solve(vander, values.T).T
    bad = ~np.all(np.isfinite(coeffs), axis=1)
    if bad.any():  # sliver triangles on the hull where scipy could not locate a sample
        lin, lin_origin, lin_inv = linear_pieces(tri, energies)
        t = np.flatnonzero(bad) // 3
        coeffs[bad], origin[bad] = lin[t], lin_origin[t]
        jac[bad] = np.linalg.inv(lin_inv[t])
    return coeffs, origin, np.linalg.inv(jac)
