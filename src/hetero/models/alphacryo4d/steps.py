"""AlphaCryo4D's own analysis step (run by ``analyze.py`` after the shared ones, from the run
manifest's ``analysis_steps``).

``volume_landscape(ctx)`` (stage 8 of the method, Wu et al. 2022 Fig. 1): the pseudo-energy
landscape of the resampled volumes with the minimum-energy path, the volumes (sized by their
particle counts) and the states; the voting table (volumes and voted particles per state,
discard rate); with ground truth, the precision, recall, discard rate and ARI of the kept
particles (:func:`hetero.analysis.classification.classification_scores`); and the maps of the
states in path order as a ChimeraX series that plays along the path: the reconstructions of
each state's voted particles (the shared ``reconstruction`` step, half maps and FSC in
``maps/reconstructed/method_voted_state/``) or, when that step is off, the method's state maps
(particle-weighted mean of each state's volumes). Writes ``maps/path/path_NNN.mrc`` +
``path.cxc`` and ``figures/alphacryo4d_landscape.png``; metrics under ``alphacryo4d``.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from hetero.analysis import report as R

SECTION = "AlphaCryo4D: volume landscape, path and voting"


def volume_landscape(ctx) -> None:
    """See the module docstring. Reads the manifest parts ``landscape``, ``path``,
    ``states``, ``voting_summary``; ``ctx.result.volume_embedding`` / ``volume_counts``."""
    run, result = ctx.run, ctx.result
    blocks = ctx.section(SECTION)
    metrics: dict = {}
    states = np.load(run.part_path("states"))
    path_file = run.part_path("path")
    path = np.load(path_file) if path_file is not None and path_file.is_file() else None
    with np.load(run.part_path("landscape")) as f:
        land = {k: f[k] for k in ("grid_x", "grid_y", "grid", "minima")}
    png = _figure(ctx.fig_dir / "alphacryo4d_landscape.png", land, result.volume_embedding,
                  result.volume_counts, path, states)
    ctx.files.append(png)
    blocks.append(R.image(png, f"G = -ln(n_v / sum n) over the t-SNE embedding of {len(result.volume_counts)} "
                               "volumes (green, sized by particles), the minimum-energy path (yellow) "
                               "and the states (numbered)"))
    summary = json.loads(run.part_path("voting_summary").read_text())
    labels = np.asarray(result.labels)
    sizes = np.bincount(labels[labels >= 0], minlength=len(states))
    vols = summary.get("volumes_per_state", [None] * len(states))
    blocks.append(R.table(
        [(k, f"{states[k, 0]:.3g}", f"{states[k, 1]:.3g}", vols[k], int(sizes[k])) for k in range(len(states))],
        ["state", "x", "y", "volumes", "voted particles"]))
    blocks.append(R.paragraph(
        f"Voting ({summary.get('mode')}, threshold {summary.get('threshold')} of "
        f"{summary.get('votes_per_particle')} votes, radius {summary.get('radius'):.3g}): "
        f"{int((labels < 0).sum())} of {len(labels)} particles discarded "
        f"({100 * float((labels < 0).mean()):.1f} %)."))
    metrics.update(state_sizes=sizes.tolist(), discard_rate=float((labels < 0).mean()),
                   n_states=int(len(states)))
    truth = ctx.truth if ctx.cfg.get("ground_truth", {}).get("enabled", True) else None
    if truth is not None and truth.get("labels") is not None:
        metrics["scores"] = _scores(blocks, np.asarray(truth["labels"]), labels)
    maps, what = _path_maps(ctx)
    if maps is not None:
        ctx.write_series("maps/path", maps, "path", play=True)
        blocks.append(R.paragraph(f"Maps along the path ({what}): maps/path/ (open path.cxc in ChimeraX "
                                  "to play them in path order)."))
    ctx.metrics["alphacryo4d"] = metrics


def _scores(blocks, true: np.ndarray, labels: np.ndarray) -> dict:
    from hetero.analysis.classification import classification_scores

    s = classification_scores(true, labels)
    keep = ("precision_mean", "precision_weighted", "recall_mean", "discard_rate", "ari_kept",
            "states_found", "n_kept")
    out = {k: (float(s[k]) if isinstance(s[k], float | np.floating) else int(s[k])) for k in keep}
    blocks.append(R.paragraph("Voted states against the true states (each voted state is labelled "
                              "with the true state holding most of its particles):"))
    blocks.append(R.table([(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in out.items()],
                          ["score", "value"]))
    return out


def _path_maps(ctx) -> tuple[torch.Tensor | None, str]:
    from hetero.analysis.steps.clustering import label_slug

    kind = f"method_{label_slug(ctx.result.label_name)}"
    groups = ctx.state.get("reconstructed", {}).get(kind)
    if groups:
        order = sorted(groups, key=lambda g: g.group)
        return torch.stack([g.full for g in order]), "reconstructed from each state's voted particles"
    maps = ctx.state.get("method_state_maps")
    if maps is None and ctx.result.state_maps is not None:
        from hetero.analysis.volumes import resample_to_box

        maps = resample_to_box(ctx.result.state_maps, float(ctx.result.voxel_size), ctx.box, ctx.apix)
    return (None, "") if maps is None else (torch.as_tensor(maps), "mean of each state's volumes")


def _figure(png, land: dict, points, counts, path, states):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hetero.utils.files import atomic_write

    xs, ys, g = land["grid_x"], land["grid_y"], land["grid"]
    fig = Figure(figsize=(6.5, 5.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(np.asarray(g).T, origin="lower", cmap="Spectral_r", aspect="auto",
                   extent=(xs[0], xs[-1], ys[0], ys[-1]))
    fig.colorbar(im, ax=ax, label="G = -ln(n / sum n) (k_B T)")
    if points is not None and len(points):
        s = 200 * np.asarray(counts, float) / max(float(np.max(counts)), 1.0)
        ax.scatter(points[:, 0], points[:, 1], s=s, c="forestgreen", alpha=0.6, linewidths=0)
    if path is not None:
        ax.plot(path[:, 0], path[:, 1], color="gold", lw=2)
    ax.scatter(states[:, 0], states[:, 1], c="k", s=18)
    for i, (x, y) in enumerate(states):
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    png.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(png, lambda p: fig.savefig(p, format="png"))
