"""Reconstructed maps against the true states (part of step ``reconstruction``).

For each true state ``s``: the map of the cluster (and of the method's label) holding most of
``s``'s particles, the consensus map (all particles) and the reconstruction from exactly the
particles of ``s`` (what these particles give with perfect classification),
each scored by FSC against the true map of ``s`` (CryoBench AUC, FSC=0.5 and 0.143 in Å). The
report says whether these maps or the decoded ones (step ``ground_truth``) are closer.
"""

from __future__ import annotations

import numpy as np

from hetero.analysis import metrics as M
from hetero.analysis import plots as P
from hetero.analysis import report as R

SECTION = "Ground truth"


def majority_groups(labels: np.ndarray, truth: np.ndarray) -> dict[int, int]:
    """``{state: group holding most of the state's particles}`` (labels ``-1`` ignored)."""
    out = {}
    for s in np.unique(truth):
        lab = labels[(truth == s) & (labels >= 0)]
        out[int(s)] = int(np.bincount(lab).argmax()) if lab.size else -1
    return out


def score_reconstructions(ctx) -> None:
    """Per-state FSC of reconstructed maps against ``ctx.truth["volumes"]``; adds
    ``ground_truth.reconstructed`` and flat ``reconstructed_*`` keys to the metrics."""
    truth = ctx.truth
    labels_true = np.asarray(truth["labels"])
    vols = truth["volumes"]
    states = [int(s) for s in np.unique(labels_true)]
    rec = ctx.state["reconstructed"]
    scored: dict[str, dict] = {}
    curves: dict[str, list[float]] = {}
    for kind, groups in rec.items():
        if kind == "truth_states":
            chosen = {s: s for s in states}
        elif kind == "consensus":
            chosen = {s: 0 for s in states}
        else:
            labels = (
                ctx.state["clusters"].labels
                if kind == "clusters"
                else np.asarray(ctx.state["method_labels"])
            )
            chosen = majority_groups(np.asarray(labels), labels_true)
        rows = []
        for s in states:
            g = chosen[s]
            if g < 0 or groups[g].n_particles == 0:
                continue
            row = M.fsc_summary(groups[g].full, vols[s], ctx.apix)
            curve = row.pop("curve")
            if kind in ("clusters", "truth_states") and len(states) <= 10:
                curves[f"{kind.replace('_', ' ')}: state {s}"] = curve
            first = ctx.state.get("reconstructed_first", {}).get(kind, 0)  # as in the file names
            rows.append({"state": s, "group": g + first, "particles": groups[g].n_particles, **row})
        if rows:
            scored[kind] = {
                "per_state": rows,
                "auc_mean": float(np.mean([r["auc"] for r in rows])),
                "res_0.5_mean": float(np.mean([r["res_0.5"] for r in rows])),
                "res_0.143_mean": float(np.mean([r["res_0.143"] for r in rows])),
            }
    gt = ctx.metrics.setdefault("ground_truth", {})
    gt["reconstructed"] = scored
    for kind, key in (
        ("clusters", "reconstructed"),
        ("truth_states", "true_state_reconstruction"),
        ("consensus", "consensus_reconstruction"),
    ):
        if kind in scored:
            gt[f"{key}_per_state_auc_mean"] = scored[kind]["auc_mean"]
            gt[f"{key}_per_state_res_0.5_mean"] = scored[kind]["res_0.5_mean"]
    _report(ctx, scored, gt, curves)


def _report(ctx, scored: dict, gt: dict, curves: dict) -> None:
    blocks = ctx.section(SECTION)
    rows = []
    if "per_state_auc_mean" in gt:
        rows.append(
            (
                "decoded at each state's mean embedding (step ground_truth)",
                gt["per_state_auc_mean"],
                gt["per_state_res_0.5_mean"],
                gt["per_state_res_0.143_mean"],
            )
        )
    names = {
        "clusters": "reconstructed: cluster holding most of the state",
        "truth_states": "reconstructed: the state's own particles (perfect classification)",
        "consensus": "reconstructed: all particles (consensus)",
    }
    for kind, s in scored.items():
        rows.append(
            (
                names.get(kind, f"reconstructed: {kind.replace('_', ' ')} (majority)"),
                s["auc_mean"],
                s["res_0.5_mean"],
                s["res_0.143_mean"],
            )
        )
    blocks.append(
        R.table(
            rows,
            [
                "map of each true state",
                "FSC AUC vs truth (mean)",
                "FSC=0.5 (Å, mean)",
                "FSC=0.143 (Å, mean)",
            ],
        )
    )
    if "clusters" in scored and "per_state_auc_mean" in gt:
        rec, dec = scored["clusters"]["auc_mean"], gt["per_state_auc_mean"]
        closer = "reconstructed cluster maps" if rec > dec else "decoded maps"
        gt["closer_to_truth"] = "reconstructed" if rec > dec else "decoded"
        blocks.append(
            R.paragraph(
                f"Closer to the true states: the {closer} (mean FSC AUC {max(rec, dec):.3f} vs "
                f"{min(rec, dec):.3f}; ceiling {(ctx.box // 2 - 1) / ctx.box:.3f})."
            )
        )
    blocks.append(
        R.paragraph(
            "FSC against a true map weighs the whole map: where the states differ in a small part "
            "of the molecule, a map from more particles (the consensus) can score as high as one "
            "from the right particles only; compare the maps themselves (galleries above).",
            "note",
        )
    )
    if curves:
        png = P.fsc_curves(
            ctx.fig_dir / "fsc_states_reconstructed.png",
            curves,
            ctx.box,
            ctx.apix,
            "FSC: reconstructed maps vs true volumes",
        )
        blocks.append(R.image(png, "Reconstructed maps against the true states"))
