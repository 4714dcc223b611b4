"""Step ``report`` (always last): summary, training curves, ``metrics.json``, ``report.html``."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from hetero.analysis import plots as P
from hetero.analysis import report as R
from hetero.utils.files import write_json

# The method's own assignment (class3d classes, AlphaCryo4D voted states) leads when there is
# one: it is what the method hands the user; k-means on the embedding is the shared yardstick.
GT_SUMMARY = (
    ("method_ari", "ARI, the method's own assignment"),
    ("method_ami", "AMI, the method's own assignment"),
    ("method_labelled_fraction", "fraction of the particles the method labelled"),
    ("ari", "ARI, k-means on the embedding (k = true states)"),
    ("ami", "AMI, k-means on the embedding (k = true states)"),
    ("oracle_ari", "oracle ARI (ceiling)"),
    ("method_ari_fraction_of_oracle", "ARI of the method's own assignment / oracle ARI"),
    ("ari_fraction_of_oracle", "ARI of k-means / oracle ARI"),
    ("per_state_auc_mean", "per-state FSC AUC, decoded (mean)"),
    ("per_state_res_0.5_mean", "per-state FSC=0.5, decoded (Å, mean)"),
    ("reconstructed_per_state_auc_mean", "per-state FSC AUC, reconstructed clusters (mean)"),
    ("reconstructed_per_state_res_0.5_mean", "per-state FSC=0.5, reconstructed clusters (Å, mean)"),
    (
        "true_state_reconstruction_per_state_auc_mean",
        "per-state FSC AUC, true-state reconstructions (mean)",
    ),
    ("per_image_fsc_auc_mean", "per-image FSC AUC (mean)"),
)


def report(ctx) -> None:
    """Write ``metrics.json`` and ``report.html`` from everything the earlier steps left."""
    start = ctx.state.get("start_time")
    seconds = time.perf_counter() - start if start is not None else float("nan")
    ctx.metrics["time_seconds"] = seconds
    ctx.sections["Summary"] = [R.table(summary_rows(ctx, seconds))]
    _training(ctx)
    metrics_path = write_json(ctx.out / "metrics.json", finite(ctx.metrics))
    ctx.files.append(metrics_path)
    ctx.files += sorted(ctx.fig_dir.glob("*.png"))
    ctx.sections["Files"] = [
        R.paragraph(f"All paths relative to {ctx.out}."),
        R.file_list(ctx.out, compact(ctx.files, ctx.out)),
    ]
    path = R.write_report(
        ctx.out / "report.html",
        "hetero analysis",
        ctx.sections,
        subtitle=f"{ctx.run.path} · {ctx.run.checkpoint.name}",
    )
    ctx.state["report"] = path
    print_summary(ctx.metrics, path)


def _training(ctx) -> None:
    blocks = ctx.section("Training")
    png = P.loss_curves(ctx.fig_dir / "loss.png", ctx.run.metrics_csv)
    blocks.append(
        R.image(png, "Loss terms (Lightning CSV log)")
        if png
        else R.paragraph(f"No CSV training log at {ctx.run.metrics_csv}.", "note")
    )
    train_metrics = ctx.run.path / "train_metrics.json"
    if train_metrics.is_file():
        tm = json.loads(train_metrics.read_text())
        blocks.append(R.table(sorted((k, v) for k, v in tm.items()), ["metric", "value"]))


def summary_rows(ctx, seconds: float) -> list[tuple]:
    info, m, result = ctx.run.info, ctx.metrics, ctx.result
    rows = [
        ("run directory", str(ctx.run.path)),
        ("checkpoint", ctx.run.checkpoint.name),
        ("method", result.method),
        ("particles", result.n_particles),
        (f"embedding ({result.embedding_name}) dimension", result.embedding_dim),
        (
            "original box / pixel size",
            f"{info['original_box']} px, {float(info['original_apix']):.4g} Å/px",
        ),
        ("training box / pixel size", f"{info['box_size']} px, {float(info['apix']):.4g} Å/px"),
    ]
    if result.voxel_size:
        t = int(round(ctx.box * ctx.apix / result.voxel_size))
        rows.append(("decoder template", f"{t} px, {result.voxel_size:.4g} Å/voxel"))
    if "clusters" in m:
        counts = m["clusters"]["counts"]
        sizes = f"(sizes {min(counts)} to {max(counts)})"
        rows.append(("clusters", f"{len(counts)}{_requested(m['clusters'])} {sizes}"))
    for kind, groups in (m.get("reconstructed") or {}).items():
        summary = reconstruction_summary(groups)
        if summary:
            label, res = summary
            rows.append(
                (
                    f"reconstructed {kind.replace('_', ' ')}: FSC=0.143 (Å, {label})",
                    f"{min(res):.3g} to {max(res):.3g}" if len(res) > 1 else f"{res[0]:.3g}",
                )
            )
    rows += list((m.get("headline") or {}).items())
    gt = m.get("ground_truth") or {}
    rows += [(label, float(gt[key])) for key, label in GT_SUMMARY if key in gt]
    if "closer_to_truth" in gt:
        rows.append(("closer to the true states", f"{gt['closer_to_truth']} maps"))
    for v in (gt.get("neighbourhood_similarity") or {}).values():
        rows.append((f"neighbourhood similarity (k = {v['k']})", float(v["similarity"])))
    rows.append(("analysis time", f"{seconds:.1f} s"))
    return rows


def _requested(clusters: dict) -> str:
    """``" of 20 requested"`` when k-means kept fewer clusters than ``n_clusters``, else ``""``."""
    asked = clusters.get("k_requested")
    return f" of {asked} requested" if asked is not None and asked != clusters.get("k") else ""


def reconstruction_summary(groups: list[dict]) -> tuple[str, list[float]] | None:
    """The FSC = 0.143 resolutions (Å) of one kind of reconstructed group and what they are.

    The masked ones when every group with a resolution has one (``"masked, corrected"``, or
    ``"masked"`` when some group's unmasked FSC never dropped below 0.8 so that its masked curve
    is uncorrected), else the unmasked ones of all of them (``"unmasked"``): values of different
    kinds are never put under one label. ``None`` when no group has a resolution.
    """
    scored = [g for g in groups if g.get("res_0.143_unmasked")]
    if not scored:
        return None
    if all(g.get("res_0.143_masked") for g in scored):
        corrected = all(g.get("randomise_from_angstrom") is not None for g in scored)
        return ("masked, corrected" if corrected else "masked"), [
            g["res_0.143_masked"] for g in scored
        ]
    return "unmasked", [g["res_0.143_unmasked"] for g in scored]


def finite(obj):
    """JSON-safe copy: non-finite floats become strings (``"inf"``)."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if isinstance(obj, float | np.floating) and not math.isfinite(float(obj)):
        return str(float(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def compact(files: list[Path], root: Path, per_folder: int = 6) -> list[Path]:
    """At most ``per_folder`` entries per folder (plus the folder itself when cut)."""
    by_folder: dict[Path, list[Path]] = {}
    for f in dict.fromkeys(Path(p) for p in files):
        by_folder.setdefault(f.parent, []).append(f)
    out: list[Path] = []
    for folder, items in by_folder.items():
        out += [*items[: per_folder - 1], folder] if len(items) > per_folder else items
    return out


def print_summary(metrics: dict, report_path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="hetero analysis", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("particles", str(metrics.get("n_particles")))
    if "clusters" in metrics:
        table.add_row("clusters", f"{metrics['clusters']['k']}{_requested(metrics['clusters'])}")
    for kind, groups in (metrics.get("reconstructed") or {}).items():
        summary = reconstruction_summary(groups)
        if summary:
            label, res = summary
            table.add_row(f"{kind} FSC=0.143 (Å, {label})", f"{min(res):.3g}-{max(res):.3g}")
    for label, text in (metrics.get("headline") or {}).items():
        table.add_row(label, str(text))
    gt = metrics.get("ground_truth") or {}
    for key, label in GT_SUMMARY:
        if key in gt:
            table.add_row(label, f"{float(gt[key]):.4g}")
    for v in (gt.get("neighbourhood_similarity") or {}).values():
        table.add_row(f"neighbourhood_similarity@{v['k']}", f"{v['similarity']:.4g}")
    console = Console()
    console.print(table)
    console.print(f"Report: [bold]{report_path}[/bold]")
