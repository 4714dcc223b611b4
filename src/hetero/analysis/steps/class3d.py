"""Step of ``model=class3d`` (its manifest's ``analysis_steps``): what RELION's Class3D writes
beside its maps.

- ``class3d/particles.star``: every particle with the original columns plus ``rlnClassNumber``
  (1-based argmax class of replicate 0, as RELION numbers classes) and
  ``rlnMaxValueProbDistribution`` (its posterior there); with ``U > 1`` replicates, one
  ``class3d/particles_replicate_UUU.star`` per replicate (particles it contains only) and the
  class maps of replicates 1.. in ``maps/method/replicate_UUU/class_NNN.mrc`` (replicate 0's
  are the method's state maps, ``maps/method/class_NNN.mrc``);
- ``class3d/iterations.csv``: per EM iteration and class (replicate 0): class fraction
  (``fraction_K``), resolution in Å (``resolution_angstrom_K``; ``model.class_resolution``:
  RELION's SSNR = 1 estimate, or half-set FSC = 0.143), the resolution in Å where FSC(new,
  previous map) drops below 0.5 (``fsc_change_angstrom_K``), and per iteration
  the current resolution, mean log-likelihood, fraction of changed assignments and mean max
  posterior (RELION's ``_model.star`` and ``_optimiser`` quantities);
- a report section "Classification" with those tables (class distribution: the posterior-weighted
  fraction of the last EM iteration, RELION's ``rlnClassDistribution``; particles: how many have
  the class as their most probable one in the inference pass after training, as in
  ``particles.star``; the two can differ by more than soft vs hard counting) and the class distribution per iteration
  (``figures/class3d_distribution.png``).

Reads the model from ``ctx.result.extras["model"]`` (the generic loader puts it there) and the
per-particle arrays from ``ctx.result``; needs the particle table for the star files.
"""

from __future__ import annotations

import numpy as np

from hetero.analysis import plots as P
from hetero.analysis import report as R
from hetero.data.io.star_writer import write_star
from hetero.models.class3d.diagnostics import unsettled_message
from hetero.utils.files import write_text
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)

SECTION = "Classification"


def class3d(ctx) -> None:
    """Write the class3d tables and star files (module docstring)."""
    result, model = ctx.result, ctx.result.extras["model"]
    out = ctx.out / "class3d"
    out.mkdir(parents=True, exist_ok=True)
    blocks = ctx.section(SECTION)
    history = _history_rows(model)
    ctx.files.append(write_text(out / "iterations.csv", _csv(history)))
    last = history[-1] if history else {}
    unsettled = unsettled_message(model.hist_changes[-1]) if history else None
    if unsettled:  # what training warned, repeated where the user reads the result
        log.warning(f"class3d: {unsettled}")
        blocks.append(R.paragraph(f"Warning: {unsettled}."))
    ctx.metrics["class3d"] = {
        "settled": unsettled is None,
        "iterations": int(model.iteration),
        "class_fractions": [float(v) for v in model.prior[0].tolist()],
        "final_changes": last.get("changes"),
        "final_resolution": last.get("current_resolution_angstrom"),
    }
    blocks.append(R.paragraph(
        f"{int(model.iteration)} EM iterations (the first is the seeding iteration), "
        f"{model.n_classes} classes, {model.n_replicates} replicate(s); replicate 0 below."))
    k = model.n_classes
    rows = [(r["iteration"], r["current_resolution_angstrom"], r["loglik"], r["changes"], r["pmax"],
             *(r[f"fraction_{c + 1}"] for c in range(k))) for r in history]
    blocks.append(R.table(rows, ["iteration", "current resolution (Å)", "log-likelihood", "changes",
                                 "mean max posterior", *(f"class {c + 1} distribution" for c in range(k))]))
    classes = np.asarray(result.labels)
    if history:
        counts = np.bincount(classes[classes >= 0], minlength=k)
        blocks.append(R.table(
            [(c + 1, last[f"fraction_{c + 1}"], int(counts[c]), last[f"resolution_angstrom_{c + 1}"],
              last[f"fsc_change_angstrom_{c + 1}"])
             for c in range(k)],
            ["class", "class distribution (posterior-weighted, last EM iteration)",
             "particles (most probable class, inference pass after training)",
             {"ssnr": "resolution, SSNR = 1 (Å)"}.get(model.cfg.class_resolution, "half-set FSC 0.143 (Å)"),
             "FSC vs previous iteration 0.5 (Å)"]))
        fractions = np.array([[r[f"fraction_{c + 1}"] for c in range(k)] for r in history])
        blocks.append(R.image(P.class_distribution(ctx.fig_dir / "class3d_distribution.png", fractions,
                                                   model.label_first), "Class distribution per EM iteration"))
    table = ctx.datamodule("class3d star file").table
    if len(table) != result.n_particles:
        raise ValueError(f"the data have {len(table)} particles but the run's posteriors {result.n_particles}")
    pmax = np.asarray(result.per_particle["max_prob"], dtype=np.float64)
    ctx.files.append(write_star(
        out / "particles.star", table, np.flatnonzero(classes >= 0),
        columns={"rlnClassNumber": classes + model.label_first, "rlnMaxValueProbDistribution": pmax}))
    rep_cls = result.per_particle.get("replicate_class")
    if rep_cls is not None:
        rep_p = np.asarray(result.per_particle["replicate_max_prob"], dtype=np.float64)
        for u in range(rep_cls.shape[1]):
            ctx.files.append(write_star(
                out / f"particles_replicate_{u:03d}.star", table, np.flatnonzero(rep_cls[:, u] >= 0),
                columns={"rlnClassNumber": rep_cls[:, u] + model.label_first, "rlnMaxValueProbDistribution": rep_p[:, u]}))
    if model.n_replicates > 1:  # replicate 0's maps are the method's state maps (maps/method/)
        from hetero.analysis.volumes import resample_to_box

        for u in range(1, model.n_replicates):
            vols = resample_to_box(model.maps[u].detach().float().cpu(), float(model.template_voxel_size()),
                                   ctx.box, ctx.apix)
            ctx.write_series(f"maps/method/replicate_{u:03d}", vols, "class", first=model.label_first)
    blocks.append(R.file_list(ctx.out, [p for p in ctx.files if out in p.parents]))


def _history_rows(model) -> list[dict]:
    """One dict per completed iteration (replicate 0), NaN where a value does not exist."""
    rows = []
    for i in range(model.hist_loglik.shape[0]):
        weight = model.hist_class_weight[i, 0]
        total = float(weight.sum())
        row = {"iteration": i + 1, "current_resolution_angstrom": float(model.hist_resolution[i, 0]),
               "loglik": float(model.hist_loglik[i, 0]), "changes": float(model.hist_changes[i, 0]),
               "pmax": float(model.hist_pmax[i, 0])}
        for c in range(model.n_classes):
            row[f"fraction_{c + 1}"] = float(weight[c]) / total if total > 0 else float("nan")
            row[f"resolution_angstrom_{c + 1}"] = float(model.hist_class_resolution[i, 0, c])
            row[f"fsc_change_angstrom_{c + 1}"] = float(model.hist_fsc_change[i, 0, c])
        rows.append(row)
    return rows


def _csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    return ",".join(keys) + "\n" + "".join(",".join(f"{r[k]:.6g}" for k in keys) + "\n" for r in rows)
