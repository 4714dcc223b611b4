"""Step ``subsets``: particle subsets per cluster (and per label of the method's own assignment).

Writes ``subsets/cluster_NNN.{star,npy,txt}`` (:func:`hetero.analysis.subsets.write_subset`;
``subsets.clusters`` selects and merges clusters) and ``subsets/<label>_NNN.*`` for the
method's labels (numbered from ``result.label_first``; when 1, RELION's class numbering, their
star files carry ``rlnClassNumber``). Needs the particle table: a data-module error stops the
analysis.
"""

from __future__ import annotations

import numpy as np

from hetero.analysis.steps.clustering import label_slug
from hetero.analysis.subsets import cluster_subsets, write_subset


def subsets(ctx) -> None:
    """Write the subsets of ``ctx.state["clusters"]`` and ``ctx.state["method_labels"]``."""
    cfg = ctx.cfg.subsets
    if not cfg.enabled:
        return
    selections: dict[str, np.ndarray] = {}
    columns: dict[str, dict] = {}
    if "clusters" in ctx.state:
        selections.update(cluster_subsets(ctx.state["clusters"].labels, cfg.get("clusters")))
    if ctx.state.get("method_labels") is not None:
        labels, first = np.asarray(ctx.state["method_labels"]), ctx.result.label_first
        own = cluster_subsets(labels, None, label_slug(ctx.result.label_name), first=first)
        selections.update(own)
        if first == 1:  # RELION-numbered classes: the star files carry them, not the input's
            columns = {name: {"rlnClassNumber": labels + 1} for name in own}
    if not selections:
        return
    table = ctx.datamodule("particle subsets").table
    if len(table) != ctx.result.n_particles:
        raise ValueError(
            f"the data have {len(table)} particles but the run's embedding {ctx.result.n_particles}: "
            "subsets would name the wrong particles (recompute_latents=true encodes these data)"
        )
    task = ctx.progress.add_task("Writing particle subsets", total=len(selections))
    for name, idx in selections.items():
        ctx.files += list(write_subset(ctx.out / "subsets", name, table, idx, columns.get(name)).values())
        ctx.progress.advance(task)
    ctx.metrics["subsets"] = {name: int(len(idx)) for name, idx in selections.items()}
