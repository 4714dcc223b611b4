"""What each EM iteration leaves behind: one row of history per iteration, and the epoch's logs.

The module keeps the rows in buffers (``hist_*``, one row per completed iteration, saved in
checkpoints) and logs the values (``train/*``, ``class_fraction/*``, ``class3d/*``) at the end
of each epoch. The first (seeding) iteration has no E-step: its E-step values are NaN.

Example usage::

    row, logs = iteration_record(stats, refs, it, init, box_size, apix, device)
"""

from __future__ import annotations

import torch

from hetero.models.class3d.statistics import IterationStatistics

#: Per-iteration history buffers (one row per completed iteration) and their trailing shapes.
HISTORY = ("hist_class_weight", "hist_fsc_change", "hist_class_resolution", "hist_loglik", "hist_resolution",
           "hist_changes", "hist_pmax")


def history_shapes(u: int, k: int) -> tuple[tuple[int, ...], ...]:
    """Trailing shapes of the :data:`HISTORY` buffers for ``U`` replicates of ``K`` classes."""
    return (u, k), (u, k), (u, k), (u,), (u,), (u,), (u,)


def iteration_record(stats: IterationStatistics, refs, it: int, init: str, box_size: int, apix: float,
                     device) -> tuple[dict, dict]:
    """This iteration's history row (``name -> (U, ...)`` float64) and its log values (replicate 0)."""
    s = stats.sums
    count = s["count"].clamp(min=1)
    nan = torch.full_like(count, float("nan"))
    scored = it > 0
    row = {
        "hist_class_weight": s["class_weight"] if scored or init == "random_subsets"
        else refs.prior * count[:, None],
        "hist_fsc_change": refs.fsc_change.to(device),
        "hist_class_resolution": refs.resolution.to(device),
        "hist_loglik": s["loglik"] / count if scored else nan,
        "hist_resolution": box_size * apix / refs.radius.to(device).double().clamp(min=1),
        # changes from the previous best class; NaN where there was none (first E-step after
        # init=consensus)
        "hist_changes": torch.where(s["changes_scored"] > 0, s["changes"] / s["changes_scored"].clamp(min=1), nan)
        if scored else nan,
        "hist_pmax": s["pmax"] / count if scored else nan,
    }
    row = {name: value.double().to(device) for name, value in row.items()}
    logs = {"train/current_resolution": float(row["hist_resolution"][0])}
    if scored:
        logs.update({
            "train/loglik": float(row["hist_loglik"][0]),
            "train/changes": float(row["hist_changes"][0]),
            "train/pmax": float(row["hist_pmax"][0]),
            "train/nll_per_pixel": float(s["nll_per_pixel"].sum() / s["count"].sum().clamp(min=1)),
        })
    for k in range(refs.prior.shape[1]):
        logs[f"class_fraction/{k + 1}"] = float(refs.prior[0, k])
    return row, logs
