"""Step ``ground_truth``: the embedding and the decoded maps scored against known truth.

ARI/AMI of k-means with k = true states (and the oracle's, on synthetic data), FSC of the map
decoded at the particle nearest each true state's mean embedding against the true map
(CryoBench's per-conformation protocol), CryoBench's per-image FSC, and the neighbourhood
similarity to a continuous ground truth. Skipped when there is no truth (``ctx.truth`` is
``None``). The reconstructed maps are scored by step ``reconstruction``.
"""

from __future__ import annotations

import numpy as np
import torch

from hetero.analysis import metrics as M
from hetero.analysis import plots as P
from hetero.analysis import report as R

SECTION = "Ground truth"


def ground_truth(ctx) -> None:
    """Scores against ``ctx.truth`` into ``ctx.metrics["ground_truth"]`` and the report."""
    truth = ctx.truth
    if truth is None:
        return
    z = ctx.result.embedding
    gt = ctx.metrics.setdefault("ground_truth", {})
    gt.update(source=truth.get("source"), kind=truth.get("kind"))
    blocks = ctx.section(SECTION)
    blocks.append(R.paragraph(f"Ground truth: {truth.get('source')} ({truth.get('kind')})."))
    labels = truth.get("labels")
    if truth.get("labels_from_t"):
        gt["labels_from_t"] = True
        blocks.append(
            R.paragraph("States assigned from the continuous parameter (nearest volume).", "note")
        )
    if (
        labels is not None
        and z.shape[1] > 0
        and len(np.unique(labels)) >= 2
        and not truth.get("labels_from_t")
    ):
        _clustering_scores(ctx, gt, blocks)
    _truth_figures(ctx, blocks)
    if labels is not None and truth.get("volumes") is not None and ctx.result.decode is not None:
        _decoded_state_maps(ctx, gt, blocks)
        _per_image_fsc(ctx, gt, blocks)
    t = truth.get("t")
    if t is not None and z.shape[1] > 0:
        m = min(len(z), int(ctx.cfg.neighbourhood_max_points))
        sims = M.neighbourhood_scores(
            z, t, ctx.cfg.neighbourhood_fractions, m, seed=int(ctx.cfg.seed)
        )
        gt["neighbourhood_similarity"] = sims
        blocks.append(
            R.table(
                [
                    (f, v["k"], v["similarity"], min(1.0, v["k"] / max(m - 1, 1)))
                    for f, v in sims.items()
                ],
                ["k / N", "k", "neighbourhood similarity", "random baseline"],
            )
        )


def _clustering_scores(ctx, gt: dict, blocks: list[str]) -> None:
    truth = ctx.truth
    scores = M.clustering_scores(
        ctx.result.embedding, truth["labels"], seed=int(ctx.cfg.kmeans.seed)
    )
    gt["ari"], gt["ami"], gt["k_true"] = scores["ari"], scores["ami"], scores["k"]
    rows = [("ARI", scores["ari"]), ("AMI", scores["ami"]), ("k (true states)", scores["k"])]
    if truth.get("dataset") is not None:
        from hetero.data.synthetic.oracle import oracle_assignment

        oracle = oracle_assignment(truth["dataset"])
        gt["oracle_ari"], gt["oracle_ami"], gt["oracle_accuracy"] = (
            oracle["ari"],
            oracle["ami"],
            oracle["accuracy"],
        )
        rows += [
            ("oracle ARI (true pose, CTF and noise model; best-fitting state)", oracle["ari"]),
            ("oracle accuracy", oracle["accuracy"]),
        ]
        if oracle["ari"] > 0:
            gt["ari_fraction_of_oracle"] = scores["ari"] / oracle["ari"]
            rows.append(("ARI / oracle ARI", gt["ari_fraction_of_oracle"]))
    blocks.append(R.table(rows, ["clustering (k-means, k = true states)", "value"]))
    method_labels = ctx.state.get("method_labels")
    if method_labels is not None:
        # The method's own assignment (class3d classes, voted states), discarded (-1) left out.
        kept = np.asarray(method_labels) >= 0
        own = M.ari_ami(np.asarray(truth["labels"]).ravel()[kept], np.asarray(method_labels)[kept])
        gt["method_ari"], gt["method_ami"] = own["ari"], own["ami"]
        gt["method_labelled_fraction"] = float(kept.mean())
        name = ctx.result.label_name or "label"
        rows = [(f"ARI ({name})", own["ari"]), (f"AMI ({name})", own["ami"]),
                ("particles labelled", float(kept.mean()))]
        if gt.get("oracle_ari"):
            gt["method_ari_fraction_of_oracle"] = own["ari"] / gt["oracle_ari"]
            rows.append((f"ARI ({name}) / oracle ARI", gt["method_ari_fraction_of_oracle"]))
        blocks.append(R.table(rows, [f"the method's own {name} assignment", "value"]))


def _truth_figures(ctx, blocks: list[str]) -> None:
    emb = ctx.state.get("embedding_2d")
    if emb is None:
        return
    xy, axes, name = emb
    truth = ctx.truth
    if "labels" in truth:
        blocks.append(
            R.image(
                P.scatter_by_cluster(
                    ctx.fig_dir / f"{name}_truth_labels.png",
                    xy,
                    truth["labels"],
                    title="Embedding by true state",
                    axis_labels=axes,
                ),
                "Embedding coloured by the true state",
            )
        )
    if "t" in truth:
        t0 = np.asarray(truth["t"]).reshape(len(xy), -1)[:, 0]
        blocks.append(
            R.image(
                P.scatter_by_value(
                    ctx.fig_dir / f"{name}_truth_t.png",
                    xy,
                    t0,
                    "Embedding by true parameter",
                    "t",
                    axes,
                ),
                "Embedding coloured by the ground-truth parameter",
            )
        )


def _decoded_state_maps(ctx, gt: dict, blocks: list[str]) -> None:
    """Per state: decode at the particle nearest the state's mean embedding (or the consensus)."""
    truth, z = ctx.truth, ctx.result.embedding
    labels, vols = truth["labels"], truth["volumes"]
    states = np.unique(labels)
    if z.shape[1] > 0:
        reps = M.state_representatives(z, labels)
        maps = ctx.decode_to_original(z[[reps[int(s)] for s in states]], "Decoding true-state maps")
    else:
        reps = {int(s): -1 for s in states}
        consensus = ctx.state.get("decoded_consensus")
        if consensus is None:
            consensus = ctx.decode_to_original(
                np.zeros((1, 0), np.float32), "Decoding the consensus map"
            )[0]
        maps = consensus[None].expand(len(states), -1, -1, -1)
    if ctx.cfg.maps.enabled:
        ctx.write_series("maps/decoded/truth_states", maps, "state")
    per_state, curves = [], {}
    for i, s in enumerate(states):
        row = M.fsc_summary(maps[i], vols[int(s)], ctx.apix)
        curves[f"state {int(s)}"] = row.pop("curve")
        per_state.append(
            {
                "state": int(s),
                "particle": reps[int(s)],
                "n_particles": int(np.sum(labels == s)),
                **row,
            }
        )
    gt["per_state_fsc"] = per_state
    gt["per_state_auc_mean"] = float(np.mean([r["auc"] for r in per_state]))
    gt["per_state_res_0.5_mean"] = float(np.mean([r["res_0.5"] for r in per_state]))
    gt["per_state_res_0.143_mean"] = float(np.mean([r["res_0.143"] for r in per_state]))
    gt["auc_ceiling"] = (ctx.box // 2 - 1) / ctx.box
    blocks.append(
        R.image(
            P.fsc_curves(
                ctx.fig_dir / "fsc_states.png",
                curves,
                ctx.box,
                ctx.apix,
                "FSC: map decoded at each state's mean embedding vs true volume",
            ),
            "Per-state FSC of decoded maps against the ground-truth volumes",
        )
    )
    blocks.append(
        R.table(
            [
                (
                    r["state"],
                    r["n_particles"],
                    r["particle"],
                    r["auc"],
                    r["res_0.5"],
                    r["res_0.143"],
                )
                for r in per_state
            ],
            [
                "state",
                "particles",
                "decoded at particle",
                "FSC AUC",
                "FSC=0.5 (Å)",
                "FSC=0.143 (Å)",
            ],
        )
    )


def _per_image_fsc(ctx, gt: dict, blocks: list[str]) -> None:
    """CryoBench per-image FSC: each sampled particle's decoded map vs its true state's map."""
    z, truth = ctx.result.embedding, ctx.truth
    idx = M.per_image_sample(len(z), int(ctx.cfg.per_image_fsc_samples))
    if z.shape[1] == 0 or not len(idx):
        return
    aucs: list[float] = []
    bs = max(1, int(ctx.cfg.maps.batch_size))
    task = ctx.progress.add_task(f"Per-image FSC ({len(idx)} images)", total=len(idx))
    for start in range(0, len(idx), bs):
        chunk = idx[start : start + bs]
        pred = ctx.decode_to_original(z[chunk], None)
        aucs += M.fsc_aucs(
            pred, truth["volumes"][torch.as_tensor(truth["labels"][chunk], dtype=torch.long)]
        )
        ctx.progress.advance(task, len(chunk))
    a = np.array(aucs)
    gt.update(
        per_image_fsc_auc_mean=float(a.mean()),
        per_image_fsc_auc_std=float(a.std()),
        per_image_fsc_n=len(a),
    )
    blocks.append(
        R.table(
            [
                ("images", len(a)),
                ("mean FSC AUC", float(a.mean())),
                ("std", float(a.std())),
                ("ceiling (identical maps)", (ctx.box // 2 - 1) / ctx.box),
            ],
            ["per-image FSC (CryoBench)", "value"],
        )
    )
