"""Figures for the analysis report (matplotlib only here; no pyplot, no display needed).

Every function draws one figure, saves it as a PNG and returns the path.

Example usage::

    scatter_by_cluster(out / "umap.png", emb, km.labels, centers=emb[km.center_indices])
    loss_curves(out / "loss.png", run_dir / "logs" / "csv" / "metrics.csv")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

DPI = 110


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    from hetero.utils.files import atomic_write

    return atomic_write(path, lambda p: fig.savefig(p, format="png"))


def _cmap(n: int):
    from matplotlib import colormaps

    return colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]


def scatter_by_cluster(
    path: str | Path,
    xy: np.ndarray,
    labels: np.ndarray,
    centers: np.ndarray | None = None,
    title: str = "",
    axis_labels: tuple[str, str] = ("", ""),
    max_points: int = 50000,
    seed: int = 0,
) -> Path:
    """2-D scatter coloured by cluster, with the (snapped) centres numbered."""
    xy = np.asarray(xy)
    labels = np.asarray(labels)
    k = int(labels.max()) + 1 if labels.size else 1
    idx = np.arange(len(xy))
    if len(xy) > max_points:
        idx = np.random.default_rng(seed).choice(len(xy), max_points, replace=False)
    fig = _figure(6, 5)
    ax = fig.add_subplot()
    size = max(1.0, min(12.0, 4000.0 / max(len(idx), 1)))
    cmap = _cmap(k)
    colors = cmap(labels[idx] / max(k - 1, 1)) if k > 20 else cmap(labels[idx] % cmap.N)
    ax.scatter(xy[idx, 0], xy[idx, 1], s=size, c=colors, alpha=0.6, linewidths=0, rasterized=True)
    if centers is not None:
        centers = np.asarray(centers)
        ax.scatter(centers[:, 0], centers[:, 1], s=40, c="k", marker="x")
        for i, (x, y) in enumerate(centers):
            ax.annotate(str(i), (x, y), xytext=(3, 3), textcoords="offset points", fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    return _save(fig, path)


def scatter_by_value(
    path: str | Path, xy: np.ndarray, values: np.ndarray, title: str = "", label: str = "",
    axis_labels: tuple[str, str] = ("", ""),
) -> Path:
    """2-D scatter coloured by a continuous value (e.g. a ground-truth parameter)."""
    fig = _figure(6, 5)
    ax = fig.add_subplot()
    size = max(1.0, min(12.0, 4000.0 / max(len(xy), 1)))
    sc = ax.scatter(xy[:, 0], xy[:, 1], s=size, c=values, cmap="viridis", linewidths=0, rasterized=True)
    fig.colorbar(sc, ax=ax, label=label)
    ax.set_title(title)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    return _save(fig, path)


def hexbin_density(
    path: str | Path, xy: np.ndarray, title: str = "", axis_labels: tuple[str, str] = ("", "")
) -> Path:
    """Particle density of a 2-D embedding (log-scaled hexagonal bins)."""
    fig = _figure(6, 5)
    ax = fig.add_subplot()
    hb = ax.hexbin(xy[:, 0], xy[:, 1], gridsize=50, bins="log", cmap="viridis", mincnt=1)
    fig.colorbar(hb, ax=ax, label="particles (log)")
    ax.set_title(title)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    return _save(fig, path)


def explained_variance(path: str | Path, ratio: np.ndarray) -> Path:
    """Bar chart of the PCA explained-variance ratio with its cumulative sum."""
    ratio = np.asarray(ratio)
    x = np.arange(1, len(ratio) + 1)
    fig = _figure(5, 3.5)
    ax = fig.add_subplot()
    ax.bar(x, ratio, color="#4c72b0")
    ax.plot(x, np.cumsum(ratio), "o-", color="#dd8452", label="cumulative")
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance ratio")
    ax.set_xticks(x)
    ax.set_ylim(0, 1.05)
    ax.legend()
    return _save(fig, path)


def cluster_sizes(path: str | Path, counts: np.ndarray) -> Path:
    """Bar chart of particles per cluster."""
    counts = np.asarray(counts)
    k = len(counts)
    fig = _figure(max(4.0, 0.3 * k + 2), 3.5)
    ax = fig.add_subplot()
    cmap = _cmap(k)
    colors = [cmap(i / max(k - 1, 1)) if k > 20 else cmap(i % cmap.N) for i in range(k)]
    ax.bar(np.arange(k), counts, color=colors)
    ax.set_xlabel("cluster")
    ax.set_ylabel("particles")
    ax.set_xticks(np.arange(k))
    ax.tick_params(axis="x", labelsize=7)
    return _save(fig, path)


def class_distribution(path: str | Path, fractions: np.ndarray, first: int = 1) -> Path:
    """Class distribution (fraction of the particles, posterior-weighted) per EM iteration.

    :param fractions: ``(iterations, K)``; row ``i`` is iteration ``i + 1``.
    :param first: the number of the first class in the legend (RELION: 1).
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    n_iter, k = fractions.shape
    fig = _figure(5.5, 3.5)
    ax = fig.add_subplot()
    cmap = _cmap(k)
    x = np.arange(1, n_iter + 1)
    for c in range(k):
        color = cmap(c / max(k - 1, 1)) if k > 20 else cmap(c % cmap.N)
        ax.plot(x, fractions[:, c], "o-", ms=3, color=color, label=f"class {c + first}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("EM iteration")
    ax.set_ylabel("class distribution")
    ax.set_ylim(0, min(1.0, float(np.nanmax(fractions, initial=0.0)) * 1.1 + 0.01))
    if k <= 12:
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def loss_curves(path: str | Path, metrics_csv: str | Path) -> Path | None:
    """Loss terms from a Lightning CSVLogger ``metrics.csv`` against the global step.

    Returns ``None`` when the file is missing or holds no loss column.
    """
    import pandas as pd

    metrics_csv = Path(metrics_csv)
    if not metrics_csv.is_file():
        return None
    df = pd.read_csv(metrics_csv)
    cols = [c for c in df.columns if "loss" in c]
    if not cols or "step" not in df.columns:
        return None
    train = [c for c in cols if not c.startswith("val")]
    val = [c for c in cols if c.startswith("val")]
    panels = [p for p in (("training", train), ("validation", val)) if p[1]]
    fig = _figure(5.5 * len(panels), 3.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, group) in zip(axes, panels):
        for col in group:
            series = df[["step", col]].dropna()
            if series.empty:
                continue
            style = "-" if len(series) > 20 else "o-"
            ax.plot(series["step"], series[col], style, label=col, markersize=3, linewidth=1)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        values = df[group].to_numpy(dtype=float)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() > 0 and finite.max() / finite.min() > 100:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    return _save(fig, path)


def map_gallery(
    path: str | Path, volumes: np.ndarray, names: Sequence[str] | None = None, max_maps: int = 40
) -> Path:
    """Central slices (z, y, x) and projections (along z, y, x) of each map, one row per map."""
    vols = np.asarray(volumes)[:max_maps]
    n = len(vols)
    names = list(names) if names is not None else [str(i) for i in range(n)]
    fig = _figure(6 * 1.3, max(1.6, n * 1.3))
    axes = fig.subplots(n, 6, squeeze=False)
    titles = ["slice z", "slice y", "slice x", "proj z", "proj y", "proj x"]
    for i, vol in enumerate(vols):
        c = vol.shape[0] // 2
        panels = [vol[c], vol[:, c], vol[:, :, c], vol.sum(0), vol.sum(1), vol.sum(2)]
        for j, (ax, img) in enumerate(zip(axes[i], panels)):
            ax.imshow(img, cmap="gray", origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=8)
        axes[i, 0].set_ylabel(names[i], fontsize=8)
    return _save(fig, path)


def fsc_curves(
    path: str | Path,
    curves: dict[str, Sequence[float]],
    box_size: int,
    apix: float,
    title: str = "FSC against ground truth",
) -> Path:
    """FSC curves against spatial frequency (1/Å), with the 0.5 and 0.143 thresholds."""
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    for name, curve in curves.items():
        curve = np.asarray(curve)
        freq = np.arange(len(curve)) / (box_size * apix)
        ax.plot(freq, curve, linewidth=1, label=name)
    for thr in (0.5, 0.143):
        ax.axhline(thr, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.set_title(title)
    if len(curves) <= 20:
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def fsc_grid(
    path: str | Path,
    results: dict[str, dict],
    box_size: int,
    apix: float,
    columns: int = 4,
) -> Path:
    """One small panel per group: half-map FSC masked (solid; corrected by phase randomisation
    when the results come from :func:`hetero.analysis.resolution.half_map_resolution`), masked
    uncorrected (dotted, if given) and unmasked (dashed) against spatial frequency, the 0.143
    and 0.5 thresholds, and the 0.143 resolutions in the title
    (``"<name>: <unmasked> Å (<masked> masked)"``).

    :param results: ``{name: {"fsc_unmasked": curve, "fsc_masked": curve | None,
        "fsc_masked_uncorrected": curve | None (optional), "res_0.143_unmasked": Å,
        "res_0.143_masked": Å | None}}``.
    """
    names = list(results)
    cols = max(1, min(columns, len(names)))
    rows = (len(names) + cols - 1) // cols
    fig = _figure(2.6 * cols, 2.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_axis_off()
    for ax, name in zip(axes.flat, names):
        r = results[name]
        freq = np.arange(box_size // 2 + 1) / (box_size * apix)
        ax.plot(freq, r["fsc_unmasked"], "--", color="#4c72b0", linewidth=1, label="unmasked")
        title = f"{name}: {r['res_0.143_unmasked']:.3g} Å"
        if r.get("fsc_masked") is not None:
            ax.plot(freq, r["fsc_masked"], "-", color="#c44e52", linewidth=1, label="masked")
            if r.get("fsc_masked_uncorrected") is not None:
                ax.plot(freq, r["fsc_masked_uncorrected"], ":", color="#c44e52", linewidth=0.8,
                        label="masked, uncorrected")
            title += f" ({r['res_0.143_masked']:.3g} masked)"
        for thr in (0.5, 0.143):
            ax.axhline(thr, color="grey", linestyle=":", linewidth=0.7)
        ax.set_ylim(-0.1, 1.05)
        ax.set_title(title, fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0, 0].legend(fontsize=6)
    axes[-1, 0].set_xlabel("1/Å", fontsize=7)
    axes[-1, 0].set_ylabel("FSC", fontsize=7)
    return _save(fig, path)
