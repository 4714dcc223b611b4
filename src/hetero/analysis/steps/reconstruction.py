"""Step ``reconstruction``: maps of clusters and states reconstructed from their particles.

For every k-means cluster, every label of the method's own assignment, the consensus (all
particles) and, when the truth is known, every true state (what the particles give with perfect
classification), the particles' images at the ORIGINAL box and pixel size are backprojected with
their consensus poses and CTF, one half map per half set of the data module
(``split.npz`` / ``rlnRandomSubset``), in one pass over the data for all groups
(:func:`hetero.analysis.reconstruction.reconstruct_groups`). Written to
``maps/reconstructed/<group kind>/``::

    cluster_000.mrc  cluster_000_half1.mrc  cluster_000_half2.mrc  cluster_000_fsc.csv  ...
    resolution.csv   <kind>.cxc

with the FSC between the half maps without and with a soft mask made from the map
(:mod:`hetero.analysis.resolution`), its 0.143 and 0.5 crossings in Å, a figure of the curves
and a table per group in the report. With ground truth, each true state is scored against the
cluster (or method label) holding most of its particles, beside the consensus and the
true-state reconstructions (:mod:`hetero.analysis.steps.truth_maps`).
"""

from __future__ import annotations

import numpy as np
import torch

from hetero.analysis import plots as P
from hetero.analysis import report as R
from hetero.analysis.reconstruction import GroupMaps, reconstruct_groups
from hetero.analysis.resolution import fsc_table, half_map_resolution, map_mask
from hetero.analysis.steps.clustering import label_slug
from hetero.analysis.volumes import contour_level, write_chimerax_script
from hetero.data.io.mrc import write_volume
from hetero.utils.files import write_text

SECTION = "Reconstructed maps"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def labelings(ctx) -> dict[str, tuple[np.ndarray, str, int]]:
    """``{kind: (labels (N,), file prefix, number of label 0 in names)}`` of the groups to
    reconstruct, from the config and earlier steps' state."""
    rc, n = ctx.cfg.reconstruction, ctx.result.n_particles
    out: dict[str, tuple[np.ndarray, str, int]] = {}
    if rc.clusters and "clusters" in ctx.state:
        out["clusters"] = (ctx.state["clusters"].labels, "cluster", 0)
    if rc.method_labels and ctx.state.get("method_labels") is not None:
        slug = label_slug(ctx.result.label_name)
        out[f"method_{slug}"] = (np.asarray(ctx.state["method_labels"]), slug, ctx.result.label_first)
    if rc.consensus:
        out["consensus"] = (np.zeros(n, np.int64), "consensus", 0)
    truth = ctx.truth if rc.truth_states else None
    if truth is not None and "labels" in truth:
        out["truth_states"] = (np.asarray(truth["labels"]), "state", 0)
    return out


def reconstruction(ctx) -> None:
    """Reconstruct, write and score every group of :func:`labelings` (``reconstruction.*``)."""
    rc = ctx.cfg.reconstruction
    if not rc.enabled:
        return
    groups = labelings(ctx)
    blocks = ctx.section(SECTION)
    if not groups:
        blocks.append(
            R.paragraph(
                "No groups to reconstruct (reconstruction.clusters / consensus are off).", "note"
            )
        )
        return
    dm = ctx.datamodule("reconstruction from the particles")
    table = dm.table
    if len(table) != ctx.result.n_particles:
        raise ValueError(
            f"the data have {len(table)} particles but the run's embedding {ctx.result.n_particles}: "
            "analyse with the particles the run was trained on (or recompute_latents=true)"
        )
    apix_values = np.unique(table.pixel_size_angstrom)
    if len(apix_values) > 1:
        raise ValueError(
            f"reconstruction needs one pixel size, the particles have {apix_values.tolist()} Å: "
            "rescale them to a common pixel size or pass reconstruction.enabled=false"
        )
    maps = reconstruct_groups(
        lambda batches: dm.predict_dataloader(original_size=True, batches=batches),
        {kind: labels for kind, (labels, _, _) in groups.items()},
        table.half_set,
        int(table.box_size),
        batch_size=int(rc.batch_size),
        pad_factor=int(rc.pad_factor),
        dtype=DTYPES[str(rc.precision)],
        device=str(rc.device),
        wiener_snr=float(rc.wiener_snr),
        max_memory_bytes=int(float(rc.max_memory_gb) * 2**30) if rc.max_memory_gb else None,
        progress=ctx.progress,
        preweight_iterations=int(rc.preweight_iterations),
    )
    ctx.state["reconstructed"] = {}
    ctx.state["reconstructed_first"] = {kind: first for kind, (_, _, first) in groups.items()}
    ctx.metrics["reconstructed"] = {}
    blocks.append(
        R.paragraph(
            f"Maps backprojected from each group's particle images at the original {ctx.box} px "
            f"and {ctx.apix:.4g} Å/px with their consensus poses and CTF (Wiener constant "
            f"{float(rc.wiener_snr):g}), one half map per half set "
            f"({getattr(dm, 'half_sets_source', '?')} half sets). Resolution: FSC between the "
            "half maps at 0.143 and 0.5, without a mask and with a soft mask made from the map "
            "(low-passed, thresholded, extended, cosine edge). The masked FSC is corrected by phase "
            "randomisation beyond the shell where the unmasked FSC drops below 0.8, as RELION's "
            "postprocess (Chen et al. 2013); the uncorrected masked and phase-randomised curves are "
            "in each _fsc.csv. "
            "Folders: maps/reconstructed/<kind>/ with the full map, both half maps and the FSC "
            "curve of each group."
        )
    )
    for kind, (_, prefix, first) in groups.items():
        rows = _write_kind(ctx, kind, prefix, maps[kind], blocks, first)
        ctx.state["reconstructed"][kind] = maps[kind]
        ctx.metrics["reconstructed"][kind] = rows
    if ctx.truth is not None and ctx.truth.get("volumes") is not None and "labels" in ctx.truth:
        from hetero.analysis.steps.truth_maps import score_reconstructions

        score_reconstructions(ctx)


RESOLUTION_KEYS = (
    "group",
    "particles",
    "half1",
    "half2",
    "res_0.143_unmasked",
    "res_0.143_masked",
    "res_0.5_unmasked",
    "res_0.5_masked",
    "res_0.143_masked_uncorrected",
    "res_0.5_masked_uncorrected",
    "randomise_from_angstrom",
    "mask_fraction",
)


def _write_kind(
    ctx, kind: str, prefix: str, groups: list[GroupMaps], blocks: list[str], first: int = 0
) -> list[dict]:
    """Write the maps, FSC curves, ``resolution.csv`` and ``<kind>.cxc`` of one kind of group
    (group ``g`` named and listed as number ``g + first``) and add its table and figures to the
    report; returns the rows of ``resolution.csv``."""
    folder = ctx.out / "maps" / "reconstructed" / kind
    width = max(3, len(str(len(groups) - 1 + first)))
    rows, curves, fulls = [], {}, []
    for gm in groups:
        stem = prefix if kind == "consensus" else f"{prefix}_{gm.group + first:0{width}d}"
        row, res, path = _write_group(ctx, folder, stem, gm, first)
        rows.append(row)
        fulls.append((stem, path, gm.full))
        if res is not None:
            curves[stem] = res
    ctx.files.append(_resolution_csv(folder / "resolution.csv", rows))
    vols = torch.stack([f[2] for f in fulls])
    level = contour_level(vols, float(ctx.cfg.maps.get("contour_fraction", 0.05)))
    ctx.files.append(write_chimerax_script(folder / f"{kind}.cxc", [f[1] for f in fulls], level))
    _report_kind(ctx, kind, prefix, rows, curves, fulls, blocks)
    return rows


def _write_group(ctx, folder, stem: str, gm: GroupMaps, first: int = 0) -> tuple[dict, dict | None, object]:
    """The full map and both half maps of one group, and (with particles in both halves) the
    FSC between the half maps without and with a soft mask from the full map (``_fsc.csv``)."""
    mc = ctx.cfg.reconstruction.mask
    names = [folder / f"{stem}.mrc", folder / f"{stem}_half1.mrc", folder / f"{stem}_half2.mrc"]
    for path, vol in zip(names, (gm.full, gm.half1, gm.half2)):
        write_volume(path, vol.numpy(), ctx.apix, origin_angstrom=(0.0, 0.0, 0.0))
    ctx.files += names
    row = {
        "group": gm.group + first,
        "particles": gm.n_particles,
        "half1": gm.n_half[0],
        "half2": gm.n_half[1],
    }
    if min(gm.n_half) == 0:
        return row, None, names[0]
    mask = map_mask(
        gm.full,
        ctx.apix,
        float(mc.lowpass_angstrom),
        float(mc.threshold),
        int(mc.extend_px),
        int(mc.soft_edge_px),
    )
    res = half_map_resolution(gm.half1, gm.half2, ctx.apix, mask)
    curves = {k: res[k] for k in ("fsc_unmasked", "fsc_masked", "fsc_masked_uncorrected", "fsc_phase_randomised")}
    ctx.files.append(write_text(folder / f"{stem}_fsc.csv", fsc_table(curves, ctx.box, ctx.apix)))
    row.update({k: v for k, v in res.items() if not k.startswith("fsc_")})
    row["mask_fraction"] = None if mask is None else float(mask.mean())
    return row, res, names[0]


def _resolution_csv(path, rows: list[dict]):
    def cell(value) -> str:
        if value is None:
            return ""
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = [",".join(RESOLUTION_KEYS)]
    lines += [",".join(cell(r.get(k)) for k in RESOLUTION_KEYS) for r in rows]
    return write_text(path, "\n".join(lines) + "\n")


def _report_kind(ctx, kind, prefix, rows, curves, fulls, blocks: list[str]) -> None:
    title = kind.replace("_", " ")
    blocks.append(f"<h3>{title}</h3>")
    blocks.append(
        R.table(
            [
                (
                    r["group"],
                    r["particles"],
                    f"{r['half1']} / {r['half2']}",
                    *(
                        _res(r, k)
                        for k in ("0.143_unmasked", "0.143_masked", "0.5_unmasked", "0.5_masked")
                    ),
                    _res(r, "randomise_from_angstrom"),
                )
                for r in rows
            ],
            [
                prefix,
                "particles",
                "half 1 / half 2",
                "FSC=0.143 (Å)",
                "FSC=0.143 masked, corrected (Å)",
                "FSC=0.5 (Å)",
                "FSC=0.5 masked, corrected (Å)",
                "phases randomised beyond (Å)",
            ],
        )
    )
    if curves:
        png = P.fsc_grid(ctx.fig_dir / f"fsc_{kind}.png", curves, ctx.box, ctx.apix)
        blocks.append(
            R.image(
                png,
                f"Half-map FSC of each {title} group (solid: masked, corrected by phase "
                "randomisation as RELION's postprocess; dotted: masked, uncorrected; dashed: unmasked)",
            )
        )
    gallery = P.map_gallery(
        ctx.fig_dir / f"reconstructed_{kind}.png",
        torch.stack([f[2] for f in fulls]).numpy(),
        [f[0].replace("_", " ") for f in fulls],
    )
    blocks.append(
        R.image(gallery, f"Central slices and projections of each reconstructed {title} map")
    )


def _res(row: dict, key: str) -> str | float:
    value = row.get(key if key in row else f"res_{key}")
    return "-" if value is None else float(value)
