"""Step ``clustering``: k-means of the embedding, and the method's own labels.

Writes ``clusters/labels.npy`` (N,), ``clusters/center_indices.npy`` (K,) and
``clusters/counts.csv``; sets ``ctx.state["clusters"]``
(:class:`~hetero.analysis.latent.KMeansResult`) and, when the method labels particles itself,
``ctx.state["method_labels"]`` (``(N,)`` int, ``-1`` = discarded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from omegaconf import ListConfig

from hetero.analysis import latent as L
from hetero.analysis import plots as P
from hetero.analysis import report as R
from hetero.utils.errors import ConfigError
from hetero.utils.files import write_npy, write_text
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)

SECTION = "Clusters"


def label_slug(name: str | None) -> str:
    """File-name form of a label name (``"voted state"`` -> ``"voted_state"``)."""
    return "".join(c if c.isalnum() else "_" for c in (name or "label").strip().lower()) or "label"


def check_options(cfg) -> float:
    """Refuse ``n_clusters < 1`` and ``kmeans.min_cluster_fraction`` outside ``[0, 1)`` (called
    before the analysis writes anything); returns the fraction."""
    if int(cfg.n_clusters) < 1:
        raise ConfigError(f"n_clusters must be >= 1, got {cfg.n_clusters}")
    fraction = float(cfg.kmeans.min_cluster_fraction)
    if not 0 <= fraction < 1:
        raise ConfigError(f"kmeans.min_cluster_fraction must be in [0, 1), got {fraction:g}")
    return fraction


def _check_subset_ids(cfg, k: int, k_requested: int) -> None:
    """Refuse ``subsets.clusters`` ids beyond the clusters k-means kept, now rather than after the
    reconstructions (the subsets step comes last)."""
    sub = cfg.get("subsets")
    wanted = sub.get("clusters") if sub is not None and sub.get("enabled", True) else None
    if wanted is None:
        return
    ids = [int(c) for sel in wanted for c in (sel if isinstance(sel, Sequence | ListConfig) else [sel])]
    bad = sorted({c for c in ids if not 0 <= c < k})
    if bad:
        shrunk = k != k_requested
        why = (f"k-means kept {k} of the n_clusters={k_requested} clusters (kmeans.min_cluster_fraction; "
               "see the warning above)" if shrunk else f"n_clusters={k}")
        raise ConfigError(f"subsets.clusters: cluster ids {bad} do not exist: {why}, so the ids are "
                          f"0..{k - 1}; choose among them"
                          + (", or set kmeans.min_cluster_fraction=0" if shrunk else ""))


def clustering(ctx) -> None:
    """k-means with ``n_clusters`` (centres snapped to particles) on ``ctx.result.embedding``."""
    result, cfg = ctx.result, ctx.cfg
    z = result.embedding
    n, dim = z.shape
    blocks = ctx.section(SECTION)
    if result.labels is not None:
        _method_labels(ctx, blocks)
    if dim == 0:
        return
    k = int(cfg.n_clusters)
    if k > n:
        raise ConfigError(f"n_clusters={k} is larger than the number of particles ({n}); pass n_clusters={n} or fewer")
    fraction = check_options(cfg)
    task = ctx.progress.add_task(f"k-means (K={k})", total=None)
    min_size = max(1, math.ceil(fraction * n))
    km, tried = L.kmeans_without_specks(z, k, min_size, seed=int(cfg.kmeans.seed), n_init=int(cfg.kmeans.n_init))
    ctx.progress.update(task, total=1, completed=1)
    if len(tried) > 1:
        small = ("empty clusters (the embedding has fewer distinct points)" if min_size == 1 else
                 f"clusters of fewer than {min_size} particles (kmeans.min_cluster_fraction={fraction:g}); "
                 "the embedding has fewer separated groups")
        keep = "" if min_size == 1 else ", or kmeans.min_cluster_fraction=0 to keep the small clusters"
        note = (f"n_clusters={k}: k-means left {small}: refitted with K = {' -> '.join(map(str, tried[1:]))} "
                f"(clusters 0..{km.n_clusters - 1}). Set n_clusters to choose{keep}.")
        log.warning(note)
        blocks.append(R.paragraph(note))
    elif int(km.counts.max()) < min_size:
        note = (f"kmeans.min_cluster_fraction={fraction:g}: no cluster of the K = {k} fit holds {min_size} "
                "particles, so none was refitted away and the fit is kept as it is; a fraction above "
                "1 / n_clusters can never act.")
        log.warning(note)
        blocks.append(R.paragraph(note))
    _check_subset_ids(cfg, km.n_clusters, k)
    ctx.state["clusters"] = km
    folder = ctx.out / "clusters"
    ctx.files += [
        write_npy(folder / "labels.npy", km.labels),
        write_npy(folder / "center_indices.npy", km.center_indices),
        write_text(
            folder / "counts.csv",
            "cluster,particles,center_index\n"
            + "".join(
                f"{i},{c},{j}\n" for i, (c, j) in enumerate(zip(km.counts, km.center_indices))
            ),
        ),
    ]
    ctx.metrics["clusters"] = {
        "k": km.n_clusters,
        "k_requested": k,
        "counts": km.counts.tolist(),
        "center_indices": km.center_indices.tolist(),
    }
    blocks.append(
        R.image(
            P.cluster_sizes(ctx.fig_dir / "cluster_sizes.png", km.counts), "Particles per cluster"
        )
    )
    emb = ctx.state.get("embedding_2d")
    if emb is not None:
        xy, axes, name = emb
        blocks.append(
            R.image(
                P.scatter_by_cluster(
                    ctx.fig_dir / f"{name}_clusters.png",
                    xy,
                    km.labels,
                    xy[km.center_indices],
                    f"{axes[0][:-1]} by cluster",
                    axes,
                ),
                f"{axes[0]}/{axes[1]} coloured by cluster (x: snapped centres)",
            )
        )
    blocks.append(
        R.table(
            [
                (i, int(c), f"{100 * c / n:.1f}%", int(j))
                for i, (c, j) in enumerate(zip(km.counts, km.center_indices))
            ],
            ["cluster", "particles", "fraction", "centre particle"],
        )
    )


def _method_labels(ctx, blocks: list[str]) -> None:
    labels = np.asarray(ctx.result.labels, dtype=np.int64)
    name = ctx.result.label_name or "label"
    ctx.state["method_labels"] = labels
    kept = labels[labels >= 0]
    counts = np.bincount(kept, minlength=int(labels.max(initial=-1)) + 1)
    ctx.metrics["method_labels"] = {
        "name": name,
        "counts": counts.tolist(),
        "first": int(ctx.result.label_first),  # the number of counts[0] in file names and tables
        "discarded": int((labels < 0).sum()),
    }
    first = ctx.result.label_first
    rows = [(i + first, int(c), f"{100 * c / len(labels):.1f}%") for i, c in enumerate(counts)]
    if (labels < 0).any():
        rows.append(
            ("discarded (-1)", int((labels < 0).sum()), f"{100 * (labels < 0).mean():.1f}%")
        )
    blocks.append(R.paragraph(f"The {ctx.result.method} model's own assignment ({name}):"))
    blocks.append(R.table(rows, [name, "particles", "fraction"]))
