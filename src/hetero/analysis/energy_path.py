"""Landscape, minimum-energy path and states along it for any 2-D embedding.

AlphaCryo4D's stages 5-7 as one function for every model: the points are either volumes with
particle counts (AlphaCryo4D: ``G = -ln(n_v / sum n)`` interpolated over the volumes) or
particles (OPUS-DSD, DynaMight, class3d: ``G = -ln p`` of the smoothed particle density). The
string method runs between two minima (given, or the two deepest), ``k`` states are taken
along the path (or at the deepest minima) and every point within ``radius`` of a state is
assigned to its nearest state.

Coordinates are rescaled internally so that the embedding spans ``normalized_extent`` units
(AlphaCryo4D's t-SNE scale, for which the string step 0.1 and the reference's defaults were
chosen); every position returned is in the caller's units.

Example usage::

    lp = landscape_path(umap_xy, k=8)                # particles of an OPUS-DSD run
    lp.states, lp.labels                              # (8, 2) and (N,) with -1 = no state
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hetero.analysis.landscape import Landscape, find_minima, pseudo_energy
from hetero.analysis.string_method import StringResult, graph_path, path_states, string_method
from hetero.analysis.voting import assign_to_centers, default_radius


@dataclass
class LandscapePath:
    """Result of :func:`landscape_path` (positions in the caller's units).

    :param landscape: the landscape in internal units (``scale`` * caller's units).
    :param scale: internal units per caller unit.
    :param minima: ``(M, 2)`` minima, deepest first; ``minima_energy`` ``(M,)``.
    :param string: the string (internal units) or ``None`` when there was no pair of minima.
    :param path: ``(n_images, 2)`` path in caller's units, or ``None``.
    :param states: ``(K, 2)`` state centres; ``radius``: cluster radius.
    :param labels: ``(P,)`` nearest state within the radius, ``-1`` otherwise.
    :param distance: ``(P,)`` distance to the nearest state.
    :param state_energy: ``(K,)`` landscape energy at the states.
    :param centre: caller's-units position of the internal origin.
    """

    landscape: Landscape
    scale: float
    minima: np.ndarray
    minima_energy: np.ndarray
    string: StringResult | None
    path: np.ndarray | None
    states: np.ndarray
    radius: float
    labels: np.ndarray
    distance: np.ndarray
    state_energy: np.ndarray
    centre: np.ndarray


def landscape_path(
    points: np.ndarray,
    counts: np.ndarray | None = None,
    k: int = 10,
    states: str = "path",
    start=None,
    end=None,
    radius: float | None = None,
    interpolation: str | None = None,
    bins: int = 48,
    smoothing: float = 1.0,
    min_separation: float | None = None,
    max_minima: int | None = None,
    n_images: int = 200,
    step: float = 0.1,
    tol: float = 1e-7,
    max_steps: int = 20000,
    normalized_extent: float | None = 200.0,
    init: str = "graph",
) -> LandscapePath:
    """Landscape -> minima -> string -> states -> assignment (see module docstring).

    :param points: ``(P, 2)`` embedding of volumes (with ``counts``) or particles.
    :param counts: ``(P,)`` particles per volume; ``None``: ``points`` are particles and the
        landscape is their density.
    :param k: states; ``states``: ``"path"`` (evenly spaced along the path) or ``"minima"``
        (the ``k`` deepest minima).
    :param start, end: string endpoints (caller's units); default the two deepest minima.
    :param radius: cluster radius (caller's units); default the median distance between
        neighbouring states.
    :param interpolation: ``linear`` / ``cubic``; default linear for volumes (the reference),
        cubic for densities (already smooth).
    :param bins, smoothing: density grid (particles only).
    :param min_separation: minima closer than this merge (caller's units; default 10 % of the
        extent).
    :param normalized_extent: internal extent of the embedding; ``None`` keeps the units.
    :param init: initial string: ``"graph"`` (cheapest grid path,
        :func:`~hetero.analysis.string_method.graph_path`) or ``"straight"`` (the reference).
    :raises ValueError: fewer than two minima and no endpoints for ``states="path"``.
    """
    points = np.asarray(points, dtype=np.float64)
    extent = float(np.ptp(points, axis=0).max()) or 1.0
    scale = 1.0 if normalized_extent is None else float(normalized_extent) / extent
    centre = points.mean(0)
    xy = (points - centre) * scale

    def to_caller(p):
        return None if p is None else np.asarray(p) / scale + centre

    def to_internal(p):
        return None if p is None else (np.asarray(p, dtype=np.float64) - centre) * scale

    if counts is None:
        land = Landscape.from_density(xy, bins=bins, smoothing=smoothing, method=interpolation or "cubic")
    else:
        counts = np.asarray(counts, dtype=np.float64)
        keep = counts > 0
        land = Landscape.from_points(xy[keep], pseudo_energy(counts[keep]), interpolation or "linear")
    sep = None if min_separation is None else float(min_separation) * scale
    minima, minima_energy = find_minima(land, sep, max_minima)
    a, b = to_internal(start), to_internal(end)
    if a is None and len(minima) >= 1:
        a = minima[0]
    if b is None and len(minima) >= 2:
        b = minima[1]
    result = None
    if a is not None and b is not None:
        initial = graph_path(land, a, b) if init == "graph" else None
        result = string_method(land, a, b, n_images=n_images, step=step, tol=tol, max_steps=max_steps,
                               initial_path=initial)
    if states == "path":
        if result is None:
            raise ValueError("landscape_path: fewer than two minima; give start and end")
        centres = path_states(result.path, int(k))
    elif states == "minima":
        centres = minima[: int(k)]
    else:
        raise ValueError(f"landscape_path: states must be 'path' or 'minima', got {states!r}")
    r = default_radius(centres) if radius is None and len(centres) > 1 else radius
    r_internal = None if r is None else float(r) * (scale if radius is not None else 1.0)
    labels, distance = assign_to_centers(xy, centres, r_internal)
    return LandscapePath(
        landscape=land,
        scale=scale,
        minima=to_caller(minima),
        minima_energy=minima_energy,
        string=result,
        path=None if result is None else to_caller(result.path),
        states=to_caller(centres),
        radius=float("inf") if r_internal is None else r_internal / scale,
        labels=labels,
        distance=distance / scale,
        state_energy=land.energy(centres),
        centre=centre,
    )


def landscape_figure(path, lp: LandscapePath, points: np.ndarray | None = None, sizes: np.ndarray | None = None,
                     title: str = "", axis_labels: tuple[str, str] = ("", "")):
    """The landscape (``G``, caller's units) with the path, the states (numbered) and optional
    points (volumes sized by ``sizes``, as the reference's ``el.pdf``). Returns the PNG path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hetero.utils.files import atomic_write

    xs, ys, g = lp.landscape.grid(300)
    xs, ys = xs / lp.scale + lp.centre[0], ys / lp.scale + lp.centre[1]
    fig = Figure(figsize=(6.5, 5.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(g.T, origin="lower", cmap="Spectral_r", aspect="auto", extent=(xs[0], xs[-1], ys[0], ys[-1]))
    fig.colorbar(im, ax=ax, label="G = -ln p (k_B T)")
    if points is not None:
        s = 4 if sizes is None else 200 * np.asarray(sizes, float) / max(float(np.max(sizes)), 1e-12)
        ax.scatter(points[:, 0], points[:, 1], s=s, c="forestgreen", alpha=0.6, linewidths=0)
    if lp.path is not None:
        ax.plot(lp.path[:, 0], lp.path[:, 1], color="gold", lw=2)
    ax.scatter(lp.states[:, 0], lp.states[:, 1], c="k", s=18)
    for i, (x, y) in enumerate(lp.states):
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    return atomic_write(path, lambda p: fig.savefig(p, format="png"))
