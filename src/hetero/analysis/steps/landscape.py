"""Step ``landscape``: pseudo-energy landscape, minimum-energy path and states along it.

AlphaCryo4D's landscape analysis for every model (:func:`hetero.analysis.energy_path.
landscape_path`): on the 2-D embedding of the particles (``ctx.state["embedding_2d"]``: UMAP,
else PC1/PC2; or the embedding itself when it is 2-D) the pseudo-energy ``G = -ln p`` of the
particle density is interpolated, its minima found, the string method run between two of them
(``landscape.start``/``end`` in embedding units, default the two deepest) and ``landscape.k``
states taken along the path (or at the deepest minima). Particles within the radius of a state
belong to it (``-1``: none).

Writes ``landscape/``: ``path.npy`` (P, 2), ``states.npy`` (K, 2), ``labels.npy`` (N,),
``minima.npy``; the figure; sets ``ctx.state["landscape"]`` (the
:class:`~hetero.analysis.energy_path.LandscapePath`) and ``ctx.state["path_labels"]`` (labels
of the particles near each state, for the reconstruction step). When the model decodes, maps
decoded at each state's mean embedding go to ``maps/decoded/path/`` as a ChimeraX series (in
order along the path).
"""

from __future__ import annotations

import numpy as np

from hetero.analysis import report as R
from hetero.analysis.energy_path import landscape_figure, landscape_path
from hetero.utils.files import write_npy

SECTION = "Energy landscape and minimum-energy path"


def _points(ctx) -> tuple[np.ndarray, tuple[str, str], str] | None:
    result = ctx.result
    if result.embedding_dim == 2:
        return result.embedding, (f"{result.embedding_name} 1", f"{result.embedding_name} 2"), result.embedding_name
    if "embedding_2d" in ctx.state:
        return ctx.state["embedding_2d"]
    return None


def landscape(ctx) -> None:
    """The particle-density landscape and path of ``ctx.result`` (``landscape.*`` config)."""
    cfg = ctx.cfg.get("landscape") or {}
    if not cfg.get("enabled", True):
        return
    blocks = ctx.section(SECTION)
    found = _points(ctx)
    if found is None:
        blocks.append(R.paragraph(f"No 2-D embedding of the {ctx.result.method} particles (run the "
                                  "embedding step first, or the model has no embedding).", "note"))
        return
    xy, axes, name = found
    lp = landscape_path(
        xy, None, k=int(cfg.get("k", 10)), states=str(cfg.get("states", "path")),
        start=cfg.get("start"), end=cfg.get("end"), radius=cfg.get("radius"),
        interpolation=cfg.get("interpolation"), bins=int(cfg.get("bins", 48)),
        smoothing=float(cfg.get("smoothing", 1.0)), min_separation=cfg.get("min_separation"),
        max_minima=cfg.get("max_minima"), n_images=int(cfg.get("n_images", 200)),
        max_steps=int(cfg.get("max_steps", 20000)), init=str(cfg.get("init", "graph")),
    )
    folder = ctx.out / "landscape"
    for fname, arr in (("states.npy", lp.states), ("labels.npy", lp.labels), ("minima.npy", lp.minima)):
        ctx.files.append(write_npy(folder / fname, np.asarray(arr)))
    if lp.path is not None:
        ctx.files.append(write_npy(folder / "path.npy", lp.path))
    ctx.state["landscape"] = lp
    ctx.state["path_labels"] = lp.labels
    counts = np.bincount(lp.labels[lp.labels >= 0], minlength=len(lp.states))
    ctx.metrics["landscape"] = {
        "embedding": name, "n_minima": int(len(lp.minima)), "n_states": int(len(lp.states)),
        "radius": float(lp.radius), "state_particles": counts.tolist(),
        "path_length": None if lp.path is None else float(np.sum(np.linalg.norm(np.diff(lp.path, axis=0), axis=1))),
        "string_converged": None if lp.string is None else bool(lp.string.converged),
    }
    sample = xy[:: max(1, len(xy) // 20000)]
    png = landscape_figure(ctx.fig_dir / "landscape.png", lp, sample,
                           title=f"G = -ln p over the {name} embedding", axis_labels=tuple(axes))
    blocks.append(R.image(png, "Pseudo-energy of the particle density, the minimum-energy path (yellow) "
                               "and the states along it (numbered)"))
    blocks.append(R.table(
        [(k, f"{lp.states[k, 0]:.3g}", f"{lp.states[k, 1]:.3g}", f"{lp.state_energy[k]:.2f}", int(counts[k]))
         for k in range(len(lp.states))],
        ["state", "x", "y", "G (kT)", "particles within radius"]))
    if ctx.result.decode is not None and ctx.cfg.maps.get("enabled", True) and ctx.result.embedding_dim > 0:
        z = _state_latents(ctx.result.embedding, xy, lp)
        vols = ctx.decode_to_original(z, f"Decoding {len(z)} maps along the path")
        ctx.write_series("maps/decoded/path", vols, "path", play=True)
        blocks.append(R.paragraph(f"Maps decoded at the mean {ctx.result.embedding_name} of each state's "
                                  "particles: maps/decoded/path/ (open path.cxc in ChimeraX to play them)."))


def _state_latents(z: np.ndarray, xy: np.ndarray, lp) -> np.ndarray:
    """Mean embedding of each state's particles (the 20 particles nearest the state if none)."""
    out = np.zeros((len(lp.states), z.shape[1]), np.float32)
    for k, centre in enumerate(lp.states):
        mine = lp.labels == k
        if not mine.any():
            mine = np.argsort(np.sum((xy - centre) ** 2, 1))[:20]
        out[k] = z[mine].mean(0)
    return out
