"""Pseudo-energy landscapes over a 2-D embedding: interpolation, gradients, minima.

The pseudo-energy of a state follows the Boltzmann relation (AlphaCryo4D, Wu et al. 2022,
eq. 6, with k_B T = 1): ``G_i = -ln(n_i / sum_k n_k)``. Two sources of ``n``:

- AlphaCryo4D: one point per resampled volume, ``n_v`` its particle count
  (:func:`pseudo_energy` + :meth:`Landscape.from_points`);
- every other model: the particle density of a 2-D embedding of the latents on a grid
  (:meth:`Landscape.from_density`).

The energy between points is interpolated over their Delaunay triangulation, either
piecewise-linear (``method="linear"``, scipy's ``LinearNDInterpolator``) or with the
Clough-Tocher C1 cubic (``method="cubic"``, scipy's ``CloughTocher2DInterpolator``), as the
reference does. Both are stored here as explicit polynomials per piece (a triangle, or one of
the three micro-triangles of the Clough-Tocher split), so that energies and exact gradients
at many points cost a few array operations: the string method
(:mod:`hetero.analysis.string_method`) evaluates them tens of thousands of times. Outside the
convex hull the energy is undefined (NaN), as in scipy.

Example usage::

    G = pseudo_energy(counts)                                # (V,)
    land = Landscape.from_points(xy, G, method="cubic")      # xy (V, 2) t-SNE coordinates
    land.energy(q), land.gradient(q)                         # (P,), (P, 2)
    minima = find_minima(land, min_separation=20.0)          # (M, 2), deepest first
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Monomial exponents of the piece polynomials in the piece's affine coordinates ``(u, v)``.
_EXPONENTS = np.array(
    [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2), (3, 0), (2, 1), (1, 2), (0, 3)]
)


def monomials(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``(P, 10)`` monomials ``u^a v^b`` in :data:`_EXPONENTS` order."""
    u2, v2 = u * u, v * v
    return np.stack([np.ones_like(u), u, v, u2, u * v, v2, u2 * u, u2 * v, u * v2, v2 * v], 1)


def _monomial_derivatives(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``d/du`` and ``d/dv`` of :func:`monomials`, each ``(P, 10)``."""
    z, o = np.zeros_like(u), np.ones_like(u)
    du = np.stack([z, o, z, 2 * u, v, z, 3 * u * u, 2 * u * v, v * v, z], 1)
    dv = np.stack([z, z, o, z, u, 2 * v, z, u * u, 2 * u * v, 3 * v * v], 1)
    return du, dv


def pseudo_energy(counts: np.ndarray) -> np.ndarray:
    """Boltzmann pseudo-energy ``G = -ln(n / sum n)`` (k_B T = 1; AlphaCryo4D eq. 6).

    :param counts: ``(V,)`` non-negative particle counts (volumes, or density-grid cells).
    :return: ``(V,)`` float64; ``inf`` where a count is zero.
    :raises ValueError: negative counts or an all-zero input.
    """
    n = np.asarray(counts, dtype=np.float64).ravel()
    if np.any(n < 0) or not np.all(np.isfinite(n)):
        raise ValueError("pseudo_energy: counts must be finite and non-negative")
    total = n.sum()
    if total <= 0:
        raise ValueError("pseudo_energy: all counts are zero")
    with np.errstate(divide="ignore"):
        return -np.log(n / total)


def volume_density_landscape(
    xy: np.ndarray, counts: np.ndarray, bandwidth: float | None = None, bins: int = 96, method: str = "linear"
) -> tuple[Landscape, float]:
    """Pseudo-energy of the count-weighted DENSITY of volumes over the embedding (an option
    of hetero's, not the paper's definition).

    ``G = -ln p`` with ``p`` a Gaussian kernel density of the volumes' positions, each weighted
    by its particle count (:meth:`Landscape.from_density`; the grid extends 3 bandwidths past
    the volumes). The paper's landscape (:func:`pseudo_energy` per volume, interpolated) has a
    minimum only at a volume holding more particles than every Delaunay neighbour, so a group
    of nearby volumes of similar state often has none; here every such group is one well.

    :param xy: ``(V, 2)`` volume positions (embedding units). :param counts: ``(V,)`` particles.
    :param bandwidth: kernel standard deviation, embedding units; ``None``: the median distance
        from a volume to its nearest other volume.
    :return: ``(landscape, bandwidth used)``.
    :raises ValueError: fewer than 2 volumes, or a non-positive bandwidth.
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) < 2:
        raise ValueError("volume_density_landscape: need at least 2 volumes")
    if bandwidth is None:
        bandwidth = float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]))
    bandwidth = float(bandwidth)
    extent = float(np.ptp(xy, axis=0).max())
    if not bandwidth > 0 or extent <= 0:
        raise ValueError(f"volume_density_landscape: bandwidth must be > 0 (got {bandwidth}) and the "
                         "volumes must not all coincide")
    margin = max(0.05, 3.0 * bandwidth / extent)
    cell = extent * (1 + 2 * margin) / int(bins)
    land = Landscape.from_density(xy, weights=np.asarray(counts, dtype=np.float64), bins=int(bins),
                                  smoothing=bandwidth / cell, margin=margin, method=method)
    return land, bandwidth


@dataclass
class Landscape:
    """A pseudo-energy surface ``G(x, y)`` over a 2-D embedding, piecewise polynomial.

    Build with :meth:`from_points` or :meth:`from_density`. Piece ``k`` covers a triangle
    (linear) or a Clough-Tocher micro-triangle (cubic); a point ``q`` in it has affine
    coordinates ``(u, v) = inv_jacobian[k] @ (q - origin[k])`` and energy
    ``coeffs[k] . monomials(u, v)``.

    :param points: ``(P, 2)`` interpolation nodes (embedding units).
    :param energies: ``(P,)`` pseudo-energy at the nodes.
    :param method: ``"linear"`` or ``"cubic"``.
    :param tri: the ``scipy.spatial.Delaunay`` triangulation of ``points``.
    :param coeffs: ``(pieces, 10)`` polynomial coefficients.
    :param origin: ``(pieces, 2)``; ``inv_jacobian``: ``(pieces, 2, 2)``.
    :param piece_vertices: ``(pieces, 3, 2)`` corners of each piece.
    """

    points: np.ndarray
    energies: np.ndarray
    method: str
    tri: object
    coeffs: np.ndarray
    origin: np.ndarray
    inv_jacobian: np.ndarray
    piece_vertices: np.ndarray

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_points(cls, points: np.ndarray, energies: np.ndarray, method: str = "linear") -> Landscape:
        """Interpolate ``energies`` given at scattered ``points`` (AlphaCryo4D's landscape).

        :param points: ``(P, 2)`` embedding coordinates, ``P >= 3`` not all collinear.
        :param energies: ``(P,)`` finite energies (drop zero-count volumes first).
        :param method: ``"linear"`` (piecewise-linear on the Delaunay triangles, the
            reference default) or ``"cubic"`` (Clough-Tocher, the reference's
            ``--interpolate cubic``).
        :raises ValueError: wrong shapes, non-finite values or an unknown method.
        """
        from scipy.spatial import Delaunay

        points = np.asarray(points, dtype=np.float64)
        energies = np.asarray(energies, dtype=np.float64).ravel()
        if points.ndim != 2 or points.shape[1] != 2 or len(points) != len(energies):
            raise ValueError(
                f"Landscape: points must be (P, 2) and energies (P,), got {points.shape} and "
                f"{energies.shape}"
            )
        if len(points) < 3:
            raise ValueError(f"Landscape: need at least 3 points, got {len(points)}")
        if not (np.all(np.isfinite(points)) and np.all(np.isfinite(energies))):
            raise ValueError("Landscape: points and energies must be finite (drop empty volumes)")
        if method not in ("linear", "cubic"):
            raise ValueError(f"Landscape: method must be 'linear' or 'cubic', got {method!r}")
        tri = Delaunay(points)
        from hetero.analysis.landscape_pieces import cubic_pieces, linear_pieces

        build = linear_pieces if method == "linear" else cubic_pieces
        coeffs, origin, inv_jac = build(tri, energies)
        jac = np.linalg.inv(inv_jac)
        corners = np.stack([origin, origin + jac[:, :, 0], origin + jac[:, :, 1]], 1)
        return cls(points, energies, method, tri, coeffs, origin, inv_jac, corners)

    @classmethod
    def from_density(
        cls,
        xy: np.ndarray,
        weights: np.ndarray | None = None,
        bins: int = 48,
        smoothing: float = 1.0,
        margin: float = 0.05,
        floor: float = 1e-3,
        method: str = "cubic",
        wall_slope: float = 1.0,
    ) -> Landscape:
        """Landscape of a particle density: ``G = -ln p`` of a smoothed 2-D histogram.

        Used for models whose particles each have their own embedding (OPUS-DSD, DynaMight,
        class3d): the counts of AlphaCryo4D's volumes become the particle density per cell.

        :param xy: ``(N, 2)`` per-particle 2-D embedding.
        :param weights: optional ``(N,)`` non-negative particle weights.
        :param bins: grid cells per axis over the bounding box (plus ``margin``).
        :param smoothing: Gaussian smoothing of the histogram (standard deviation, cells).
        :param margin: fraction of the extent added on each side, so every particle lies
            inside the landscape with room for paths around the data.
        :param floor: densities below ``floor * max density`` are raised to it, capping the
            energy of empty cells at ``G_min - ln(floor)`` (a wall, not infinity).
        :param method: interpolation between cell centres (``"linear"`` or ``"cubic"``).
        :param wall_slope: beyond the floor the energy rises by this much per cell of distance
            to the nearest populated cell, so that a path through empty space feels a
            gradient back towards the particles instead of a flat plateau.
        """
        from scipy.ndimage import distance_transform_edt, gaussian_filter

        xy = np.asarray(xy, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) == 0:
            raise ValueError(f"Landscape.from_density: xy must be (N, 2), got {xy.shape}")
        lo, hi = xy.min(0), xy.max(0)
        pad = np.maximum(hi - lo, 1e-9) * margin
        edges = [np.linspace(lo[i] - pad[i], hi[i] + pad[i], int(bins) + 1) for i in range(2)]
        hist, _, _ = np.histogram2d(xy[:, 0], xy[:, 1], bins=edges, weights=weights)
        if smoothing > 0:
            hist = gaussian_filter(hist, float(smoothing), mode="constant")
        p = hist / hist.sum()
        empty = p < float(floor) * p.max()
        energy = -np.log(np.maximum(p, float(floor) * p.max()))
        if empty.any() and not empty.all() and wall_slope > 0:
            energy = energy + float(wall_slope) * distance_transform_edt(empty)
        centres = [0.5 * (e[1:] + e[:-1]) for e in edges]
        gx, gy = np.meshgrid(centres[0], centres[1], indexing="ij")
        nodes = np.stack([gx.ravel(), gy.ravel()], 1)
        return cls.from_points(nodes, energy.ravel(), method)

    # ------------------------------------------------------------------ evaluation
    @property
    def n_pieces_per_triangle(self) -> int:
        return 1 if self.method == "linear" else 3

    def locate(self, q: np.ndarray, hint: np.ndarray | None = None) -> np.ndarray:
        """Triangle of each point, ``(P,)`` int (``-1`` outside the convex hull).

        :param hint: ``(P,)`` triangles to try first (e.g. from the previous iteration of an
            iterative method); points not inside their hint are located from scratch.
        """
        q = np.asarray(q, dtype=np.float64).reshape(-1, 2)
        if hint is None:
            return self.tri.find_simplex(q).astype(np.int64)
        simplex = np.asarray(hint, dtype=np.int64).copy()
        ok = simplex >= 0
        bary = np.full((len(q), 3), -1.0)
        bary[ok] = self._barycentric(q[ok], simplex[ok])
        redo = ~np.all(bary >= -1e-12, axis=1)
        if redo.any():
            simplex[redo] = self.tri.find_simplex(q[redo])
        return simplex

    def _barycentric(self, q: np.ndarray, simplex: np.ndarray) -> np.ndarray:
        t = self.tri.transform[simplex]
        c = np.einsum("pij,pj->pi", t[:, :2], q - t[:, 2])
        return np.column_stack([c, 1.0 - c.sum(1)])

    def pieces(self, q: np.ndarray, simplex: np.ndarray) -> np.ndarray:
        """Polynomial piece of each point, given its triangle (``>= 0``)."""
        if self.method == "linear":
            return simplex
        # Clough-Tocher: micro-triangle opposite the vertex with the smallest barycentric weight.
        return 3 * simplex + np.argmin(self._barycentric(q, simplex), axis=1)

    def _affine(self, q: np.ndarray, piece: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        uv = np.einsum("pij,pj->pi", self.inv_jacobian[piece], q - self.origin[piece])
        return uv[:, 0], uv[:, 1]

    def energy(self, q: np.ndarray, simplex: np.ndarray | None = None) -> np.ndarray:
        """``G`` at ``(P, 2)`` points: ``(P,)``, NaN outside the convex hull.

        :param simplex: triangles from :meth:`locate`; where given and ``>= 0`` outside the
            hull, that triangle's polynomial is extrapolated instead of returning NaN.
        """
        q = np.asarray(q, dtype=np.float64).reshape(-1, 2)
        s = self.locate(q) if simplex is None else np.asarray(simplex, dtype=np.int64)
        out = np.full(len(q), np.nan)
        ok = s >= 0
        piece = self.pieces(q[ok], s[ok])
        u, v = self._affine(q[ok], piece)
        out[ok] = np.einsum("pk,pk->p", monomials(u, v), self.coeffs[piece])
        return out

    def gradient(self, q: np.ndarray, simplex: np.ndarray | None = None) -> np.ndarray:
        """Exact ``dG/d(x, y)`` at ``(P, 2)`` points: ``(P, 2)``, NaN outside the hull.

        Piecewise constant for ``linear`` (on an edge, the gradient of the triangle found by
        :meth:`locate`), continuous for ``cubic`` (the Clough-Tocher surface is C1).
        """
        q = np.asarray(q, dtype=np.float64).reshape(-1, 2)
        s = self.locate(q) if simplex is None else np.asarray(simplex, dtype=np.int64)
        out = np.full((len(q), 2), np.nan)
        ok = s >= 0
        piece = self.pieces(q[ok], s[ok])
        u, v = self._affine(q[ok], piece)
        du, dv = _monomial_derivatives(u, v)
        c = self.coeffs[piece]
        g_uv = np.stack([np.einsum("pk,pk->p", du, c), np.einsum("pk,pk->p", dv, c)], 1)
        # chain rule: dG/dq = J^-T dG/d(u, v)
        out[ok] = np.einsum("pji,pj->pi", self.inv_jacobian[piece], g_uv)
        return out

    def xy_polynomials(self) -> np.ndarray:
        """Each piece's polynomial in Cartesian offsets from its origin: ``(pieces, 4, 4)``
        with ``G = sum_ij P[k, i, j] dx^i dy^j`` (``dx, dy = q - origin[k]``; ``i + j <= 3``)."""
        from hetero.analysis.landscape_pieces import poly_mul

        a, b = self.inv_jacobian[:, 0, 0], self.inv_jacobian[:, 0, 1]
        c, d = self.inv_jacobian[:, 1, 0], self.inv_jacobian[:, 1, 1]
        n = len(a)
        u = np.zeros((n, 4, 4))
        v = np.zeros((n, 4, 4))
        u[:, 1, 0], u[:, 0, 1], v[:, 1, 0], v[:, 0, 1] = a, b, c, d
        one = np.zeros((n, 4, 4))
        one[:, 0, 0] = 1.0
        powers_u, powers_v = [one, u], [one, v]
        for _ in range(2):
            powers_u.append(poly_mul(powers_u[-1], u))
            powers_v.append(poly_mul(powers_v[-1], v))
        out = np.zeros((n, 4, 4))
        for k, (eu, ev) in enumerate(_EXPONENTS):
            out += self.coeffs[:, k, None, None] * poly_mul(powers_u[eu], powers_v[ev])
        return out

    # ------------------------------------------------------------------ geometry
    def contains(self, q: np.ndarray) -> np.ndarray:
        """``(P,)`` bool: inside the convex hull of the nodes."""
        return self.locate(q) >= 0

    def project_inside(self, q: np.ndarray, inset: float = 1e-9) -> np.ndarray:
        """Points outside the convex hull moved to the nearest hull point (pulled ``inset``
        times the landscape size towards the centroid so that they are located inside)."""
        q = np.array(q, dtype=np.float64).reshape(-1, 2)
        out = ~self.contains(q)
        if not out.any():
            return q
        edges = self.tri.convex_hull
        a, b = self.points[edges[:, 0]], self.points[edges[:, 1]]
        p = q[out][:, None, :]
        ab = b - a
        t = np.clip(np.einsum("pek,ek->pe", p - a, ab) / np.einsum("ek,ek->e", ab, ab), 0, 1)
        nearest = a + t[..., None] * ab
        best = np.argmin(np.sum((nearest - p) ** 2, -1), axis=1)
        moved = nearest[np.arange(len(best)), best]
        centre = self.points.mean(0)
        size = float(np.ptp(self.points, axis=0).max())
        direction = centre - moved
        norm = np.linalg.norm(direction, axis=1, keepdims=True)
        q[out] = moved + inset * size * direction / np.maximum(norm, 1e-300)
        return q

    def grid(self, n: int = 200, extent: tuple[float, float, float, float] | None = None):
        """Energy on an ``n x n`` grid for plotting and minimum search.

        :param extent: ``(xmin, xmax, ymin, ymax)``; default the nodes' bounding box.
        :return: ``(xs (n,), ys (n,), G (n, n))`` with ``G[i, j] = G(xs[i], ys[j])``
            (NaN outside the hull).
        """
        if extent is None:
            (x0, y0), (x1, y1) = self.points.min(0), self.points.max(0)
        else:
            x0, x1, y0, y1 = extent
        xs, ys = np.linspace(x0, x1, n), np.linspace(y0, y1, n)
        gx, gy = np.meshgrid(xs, ys, indexing="ij")
        g = self.energy(np.stack([gx.ravel(), gy.ravel()], 1)).reshape(n, n)
        return xs, ys, g


def find_minima(
    landscape: Landscape,
    min_separation: float | None = None,
    max_minima: int | None = None,
    grid_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Local minima of the landscape, deepest first, found on a grid inside the hull.

    A grid point is a minimum if no point within ``min_separation`` (a square window) is
    lower; minima closer than ``min_separation`` to a deeper one are dropped.

    :param min_separation: embedding units; default 10 % of the larger side of the nodes'
        bounding box.
    :param max_minima: keep at most this many.
    :return: ``(positions (M, 2), energies (M,))``.
    """
    from scipy.ndimage import minimum_filter

    xs, ys, g = landscape.grid(grid_size)
    size = float(np.ptp(landscape.points, axis=0).max())
    sep = 0.1 * size if min_separation is None else float(min_separation)
    step = max(xs[1] - xs[0], ys[1] - ys[0])
    window = 2 * max(1, int(round(sep / step))) + 1
    filled = np.where(np.isfinite(g), g, np.inf)
    is_min = np.isfinite(g) & (filled == minimum_filter(filled, size=window, mode="nearest"))
    ii, jj = np.nonzero(is_min)
    pos = np.stack([xs[ii], ys[jj]], 1)
    energy = g[ii, jj]
    order = np.argsort(energy, kind="stable")
    kept: list[int] = []
    for i in order:
        if all(np.hypot(*(pos[i] - pos[k])) >= sep for k in kept):
            kept.append(int(i))
        if max_minima is not None and len(kept) >= max_minima:
            break
    return pos[kept], energy[kept]
