"""Minimum-energy paths on a 2-D landscape: the zero-temperature (simplified) string method.

The string method of E, Ren and Vanden-Eijnden (J. Chem. Phys. 126, 164103, 2007) as used by
AlphaCryo4D (Wu et al. 2022, eqs. 7-9): ``n`` images on a curve alternate

1. evolution: every image moves down the gradient, ``phi_i <- phi_i - h grad G(phi_i)``;
2. reparametrisation: the images are redistributed at equal arc length along the piecewise
   linear curve through them (linear interpolation of the normalised arc length, eq. 9);

until the mean change per image, ``(|x - x_prev| + |y - y_prev|) / n`` (Euclidean norms of
the x and y change vectors, as the reference computes it), is at most ``tol``. With the
reference's settings the endpoints are free and slide into the minima near them
(``fix_endpoints=True`` keeps them where they were put).

Guard: an image that leaves the landscape's convex hull (where the reference's interpolant
returns NaN and destroys the string) is moved back to the nearest hull point; the number of
such corrections is reported.

Example usage::

    result = string_method(land, start=(-50, 100), end=(-80, -30), step=0.1, tol=1e-7)
    states = path_states(result.path, 7)     # (7, 2) evenly spaced along the path
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hetero.analysis.landscape import Landscape


@dataclass
class StringResult:
    """A converged (or stopped) string.

    :param path: ``(n_images, 2)`` images at equal arc length, ``path[0]`` near ``start``.
    :param energies: ``(n_images,)`` landscape energy along the path.
    :param n_steps: evolution steps performed.
    :param converged: whether the change fell to ``tol`` before ``max_steps``.
    :param hull_corrections: image positions moved back inside the convex hull.
    :param final_change: the last mean change per image.
    :param stationary: stopped because the string only oscillated in place (see
        ``stationary_window`` of :func:`string_method`), not because the change fell to ``tol``.
    :param window_drift: the mean change per image over the last full window (``nan`` before
        one).
    """

    path: np.ndarray
    energies: np.ndarray
    n_steps: int
    converged: bool
    hull_corrections: int
    final_change: float
    stationary: bool = False
    window_drift: float = float("nan")

    @property
    def length(self) -> float:
        return float(np.sum(np.linalg.norm(np.diff(self.path, axis=0), axis=1)))


def reparametrize(path: np.ndarray, n: int | None = None) -> np.ndarray:
    """``n`` points at equal arc length along the polyline ``path`` ``(P, 2)``, keeping both
    ends (linear interpolation of the normalised cumulative length, eq. 9)."""
    path = np.asarray(path, dtype=np.float64)
    n = len(path) if n is None else int(n)
    seg = np.hypot(np.diff(path[:, 0]), np.diff(path[:, 1]))
    s = np.concatenate([[0.0], np.cumsum(seg)])
    if s[-1] <= 0:
        return np.repeat(path[:1], n, axis=0)
    s /= s[-1]
    grid = np.linspace(0.0, 1.0, n)
    return np.stack([np.interp(grid, s, path[:, 0]), np.interp(grid, s, path[:, 1])], 1)


def _central_gradient(landscape: Landscape, q: np.ndarray, d: float) -> np.ndarray:
    """Central differences of the interpolated energy (the reference's gradient) at ``q``
    ``(P, 2)``, each stencil point located exactly; a stencil point just outside the hull
    uses the polynomial of its image's triangle."""
    n = len(q)
    stencil = np.concatenate([q + (d, 0.0), q - (d, 0.0), q + (0.0, d), q - (0.0, d)])
    found = landscape.locate(stencil)
    own = np.tile(landscape.locate(q), 4)
    e = landscape.energy(stencil, np.where(found >= 0, found, own)).reshape(4, n)
    return np.stack([e[0] - e[1], e[2] - e[3]], 1) / (2.0 * d)


class _PieceCache:
    """The polynomial piece each image of the string lies in, with its gradient as explicit
    quadratics in ``(dx, dy)``; re-located only when an image leaves its piece. One evolution
    step is then a few dozen array operations on the ``(2, n)`` images (the string rarely
    changes pieces), so 50,000 steps take seconds.

    ``fd_step``: ``None`` for the exact gradient, else the reference's central differences:
    inside one cubic piece they equal the exact gradient plus ``d^2`` times the cubic's
    ``dx^3`` (``dy^3``) coefficient; images whose stencil reaches another piece are
    evaluated point by point.
    """

    def __init__(self, landscape: Landscape, q: np.ndarray, fd_step: float | None):
        self.land = landscape
        p = landscape.xy_polynomials()
        gx = [p[:, 1, 0], 2 * p[:, 2, 0], p[:, 1, 1], 3 * p[:, 3, 0], 2 * p[:, 2, 1], p[:, 1, 2]]
        gy = [p[:, 0, 1], p[:, 1, 1], 2 * p[:, 0, 2], p[:, 2, 1], 2 * p[:, 1, 2], 3 * p[:, 0, 3]]
        self.piece_grad = np.stack([np.stack(gx, 1), np.stack(gy, 1)], 1)  # (pieces, 2, 6)
        third = np.stack([p[:, 3, 0], p[:, 0, 3]], 1)
        self.piece_third = third if fd_step else np.zeros_like(third)
        corners = landscape.piece_vertices - landscape.origin[:, None, :]
        edge = np.roll(corners, -1, axis=1) - corners
        normal = np.stack([-edge[..., 1], edge[..., 0]], -1)
        normal /= np.maximum(np.linalg.norm(normal, axis=-1, keepdims=True), 1e-300)
        offset = -np.einsum("pek,pek->pe", normal, corners)
        # orient inwards: the third corner of each edge has a positive value
        opposite = np.roll(corners, -2, axis=1)
        sign = np.sign(np.einsum("pek,pek->pe", normal, opposite) + offset)
        self.piece_normal = normal * sign[..., None]  # (pieces, 3, 2)
        self.piece_offset = offset * sign  # (pieces, 3)
        self.fd_step = fd_step
        n = q.shape[1]
        self.simplex = np.full(n, -1, dtype=np.int64)
        self.mono = np.ones((6, n))
        self.grad = np.zeros((2, 6, n))
        self.third = np.zeros((2, n))
        self.origin = np.zeros((2, n))
        self.normal = np.zeros((2, 3, n))
        self.offset = np.zeros((3, n))
        self.assign(q, np.arange(n))

    def assign(self, q: np.ndarray, which: np.ndarray) -> None:
        """Locate images ``which`` of ``q`` ``(2, n)`` and cache their pieces."""
        pts = q[:, which].T
        simplex = self.land.locate(pts, self.simplex[which])
        if np.any(simplex < 0):
            raise FloatingPointError("string_method: an image left the landscape's convex hull")
        piece = self.land.pieces(pts, simplex)
        self.simplex[which] = simplex
        self.grad[:, :, which] = self.piece_grad[piece].transpose(1, 2, 0)
        self.third[:, which] = self.piece_third[piece].T
        self.origin[:, which] = self.land.origin[piece].T
        self.normal[:, :, which] = self.piece_normal[piece].transpose(2, 1, 0)
        self.offset[:, which] = self.piece_offset[piece].T

    def distances(self, q: np.ndarray) -> np.ndarray:
        """``(n,)`` smallest distance of each image to an edge of its cached piece (negative:
        outside it); leaves ``dx, dy`` in ``mono[1:3]``."""
        np.subtract(q, self.origin, out=self.mono[1:3])
        h = self.normal[0] * self.mono[1]
        h += self.normal[1] * self.mono[2]
        h += self.offset
        return h.min(axis=0)

    def gradient(self, q: np.ndarray) -> np.ndarray:
        """``(2, n)`` gradient at the images ``q`` ``(2, n)``."""
        dist = self.distances(q)
        left = np.flatnonzero(dist < -1e-12)
        if left.size:
            self.assign(q, left)
            dist = self.distances(q)
        m = self.mono
        np.multiply(m[1:3], m[1], out=m[3:5])  # dx^2, dx dy
        np.multiply(m[2], m[2], out=m[5])
        g = np.einsum("kn,jkn->jn", m, self.grad)
        if self.fd_step:
            d = self.fd_step
            g += d * d * self.third
            near = np.flatnonzero(dist < d * (1 + 1e-9))
            if near.size:
                g[:, near] = _central_gradient(self.land, q[:, near].T, d).T
        return g


def string_method(
    landscape: Landscape,
    start,
    end,
    n_images: int = 500,
    step: float = 0.1,
    tol: float = 1e-7,
    max_steps: int = 100_000,
    gradient: str = "analytic",
    fd_step: float = 1e-5,
    fix_endpoints: bool = False,
    initial_path: np.ndarray | None = None,
    stationary_window: int | None = 1000,
) -> StringResult:
    """Zero-temperature string method on ``landscape`` from ``start`` to ``end``.

    :param landscape: the energy surface (:class:`~hetero.analysis.landscape.Landscape`).
    :param start: ``(2,)`` first endpoint (embedding units); moved inside the hull if outside.
    :param end: ``(2,)`` last endpoint.
    :param n_images: images on the string (reference 500).
    :param step: gradient step ``h`` (reference 0.1).
    :param tol: stop when the mean change per image is ``<= tol`` (reference 1e-7).
    :param max_steps: at most this many evolution steps (reference 100000).
    :param gradient: ``"analytic"`` (exact gradient of the interpolant) or ``"central"``
        (central differences of the interpolant with ``fd_step``, as the reference).
    :param fix_endpoints: keep the endpoints fixed (reference: they move).
    :param initial_path: ``(P, 2)`` start from this polyline instead of the straight line.
    :param stationary_window: every this many steps compare the string with the one a window
        ago; when it moved by at most 10 single steps' worth over the window it only hops back
        and forth (a linear interpolant's piecewise-constant gradient, an image pressed against
        the hull) and will never reach ``tol``: stop with ``stationary=True`` instead of running
        to ``max_steps``. A string still converging moves ~window steps' worth and is not
        stopped. ``None``: the reference's loop (``tol`` or ``max_steps`` only).
    :return: :class:`StringResult`.
    :raises ValueError: unknown ``gradient``, ``n_images < 2`` or non-positive ``step``.
    """
    if gradient not in ("analytic", "central"):
        raise ValueError(f"string_method: gradient must be 'analytic' or 'central', got {gradient!r}")
    if int(n_images) < 2 or step <= 0:
        raise ValueError("string_method: need n_images >= 2 and step > 0")
    n = int(n_images)
    if initial_path is None:
        ends = landscape.project_inside(np.array([start, end], dtype=np.float64))
        path = np.linspace(ends[0], ends[1], n)
    else:
        path = landscape.project_inside(np.asarray(initial_path, dtype=np.float64))
    path = reparametrize(path, n)
    q = np.ascontiguousarray(path.T)  # (2, n): x and y rows
    cache = _PieceCache(landscape, q, fd_step if gradient == "central" else None)
    grid = np.linspace(0.0, 1.0, n)
    arc = np.zeros(n)
    corrections, steps, change, converged = 0, 0, np.inf, False
    stationary, drift, snapshot = False, float("nan"), q.copy()
    while steps < max_steps:
        g = cache.gradient(q)
        if fix_endpoints:
            g[:, [0, -1]] = 0.0
        moved = q - step * g
        left = np.flatnonzero(cache.distances(moved) < -1e-12)
        if left.size:  # images that left their piece: still inside the hull?
            pts = moved[:, left].T
            out = landscape.locate(pts, cache.simplex[left]) < 0
            if out.any():
                corrections += int(out.sum())
                pts[out] = landscape.project_inside(pts[out])
                moved[:, left] = pts.T
        # reparametrisation at equal arc length (eq. 9)
        seg = moved[:, 1:] - moved[:, :-1]
        np.cumsum(np.hypot(seg[0], seg[1]), out=arc[1:])
        if arc[-1] > 0:
            arc /= arc[-1]
            new = np.stack([np.interp(grid, arc, moved[0]), np.interp(grid, arc, moved[1])])
        else:  # every image at one point (e.g. pressed into a corner of the hull)
            new = moved
        delta = new - q
        change = (math.sqrt(delta[0] @ delta[0]) + math.sqrt(delta[1] @ delta[1])) / n
        q = new
        steps += 1
        if not np.isfinite(change):
            raise FloatingPointError("string_method: the string became non-finite")
        if change <= tol:
            converged = True
            break
        if stationary_window and steps % int(stationary_window) == 0:
            d = q - snapshot
            drift = (math.sqrt(d[0] @ d[0]) + math.sqrt(d[1] @ d[1])) / n
            if drift <= 10.0 * change:
                stationary = True
                break
            snapshot = q.copy()
    path = np.ascontiguousarray(q.T)
    return StringResult(
        path=path,
        energies=landscape.energy(path, landscape.locate(path, cache.simplex)),
        n_steps=steps,
        converged=converged,
        hull_corrections=corrections,
        final_change=float(change),
        stationary=stationary,
        window_drift=float(drift),
    )


def graph_path(landscape: Landscape, start, end, grid_size: int = 128) -> np.ndarray:
    """A low-energy initial string: the cheapest 8-connected path between the grid points
    nearest ``start`` and ``end`` (inside the hull), each step costing its length times
    ``1 + G - G_min`` (Dijkstra). Starting the string from it instead of the straight line
    avoids converging onto a ridge the straight line happens to lie on (the string method only
    finds the path near its start, paper section 4.7). Returns ``(P, 2)`` from start to end.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import dijkstra

    (x0, y0), (x1, y1) = landscape.points.min(0), landscape.points.max(0)
    xs, ys = np.linspace(x0, x1, grid_size), np.linspace(y0, y1, grid_size)
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    nodes = np.stack([gx.ravel(), gy.ravel()], 1)
    energy = landscape.energy(nodes)
    inside = np.isfinite(energy)
    weight = 1.0 + energy - np.nanmin(energy)
    ids = np.arange(grid_size * grid_size).reshape(grid_size, grid_size)
    rows, cols, costs = [], [], []
    for di, dj in ((1, 0), (0, 1), (1, 1), (1, -1)):
        a = ids[max(0, -di) : grid_size - max(0, di), max(0, -dj) : grid_size - max(0, dj)].ravel()
        b = ids[max(0, di) :, max(0, dj) : grid_size + min(0, dj)].ravel() if dj >= 0 else ids[di:, : grid_size + dj].ravel()
        ok = inside[a] & inside[b]
        a, b = a[ok], b[ok]
        length = np.hypot(*(nodes[b] - nodes[a]).T)
        rows += [a, b]
        cols += [b, a]
        costs += [length * 0.5 * (weight[a] + weight[b])] * 2
    n = len(nodes)
    graph = coo_matrix((np.concatenate(costs), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)).tocsr()
    candidates = np.flatnonzero(inside)
    near = [candidates[np.argmin(np.sum((nodes[candidates] - np.asarray(p, float)) ** 2, 1))] for p in (start, end)]
    _, pred = dijkstra(graph, indices=near[0], return_predecessors=True)
    if pred[near[1]] < 0 and near[0] != near[1]:
        return np.array([start, end], dtype=np.float64)
    chain = [near[1]]
    while chain[-1] != near[0]:
        chain.append(pred[chain[-1]])
    inner = nodes[chain[::-1]][1:-1]
    return np.concatenate([np.asarray(start, float)[None], inner, np.asarray(end, float)[None]])


def path_states(path: np.ndarray, k: int) -> np.ndarray:
    """``k`` images evenly spaced along an equal-arc-length ``path`` (both ends included):
    ``path[linspace(0, n - 1, k).astype(int)]``, the reference's choice of cluster centres."""
    path = np.asarray(path)
    if k < 1:
        raise ValueError(f"path_states: k must be >= 1, got {k}")
    return path[np.linspace(0, len(path) - 1, int(k)).astype(int)]
