"""DynaMight's own analysis steps (named in its run manifest; run after the shared steps).

Each is ``step(ctx) -> None`` on an :class:`~hetero.analysis.context.AnalysisContext` and writes
under ``<analysis>/dynamight/``:

- :func:`pseudo_atoms`: each half set's consensus Gaussians as ``consensus_half{1,2}.cmm``
  (ChimeraX markers, radius = sigma) and ``.pdb``, and its rasterised map ``.mrc``;
- :func:`deformations`: deformation magnitude over the data set (mean / max RMSD, Å, from the
  inference pass), per-Gaussian displacements along each principal component
  (``displacements/pcN.{npz,cmm,pdb}``) and between cluster centres (``clusters.npz``, marker
  files, pairwise RMSD), marker series along the PCs with ``.cxc`` movie scripts
  (``markers/pcN/``) and movie scripts for the decoded map series (``movies/``);
- :func:`half_set_error`: the two half sets' disagreement per Gaussian on the validation
  particles (encoded by both), as a value map and a ChimeraX script colouring the consensus
  map by it, markers, a PDB (B-factor = disagreement, Å) and a report figure.

Positions follow :mod:`hetero.models.dynamight.analysis` (ChimeraX frame of the maps written at
the original box and pixel size, origin 0). Options: ``ctx.cfg.dynamight`` (all optional):
``pc_sigma`` (2), ``max_validation_particles`` (2000), ``marker_steps`` (the traversal's).
"""

from __future__ import annotations

import numpy as np
import torch

from hetero.analysis import report as R
from hetero.models.dynamight import analysis as A

SECTION = "DynaMight deformations"


def _opt(ctx, key: str, default):
    node = ctx.cfg.get("dynamight") if hasattr(ctx.cfg, "get") else None
    return default if not node or node.get(key) is None else node.get(key)


def _model(ctx):
    model = ctx.result.extras.get("model")
    if model is None or not hasattr(model, "halves"):
        raise RuntimeError("DynaMight analysis steps need the loaded model in result.extras['model']")
    return model


def _frame(ctx, positions: np.ndarray) -> np.ndarray:
    return A.chimerax_coordinates(positions, ctx.box, ctx.apix)


def _write(ctx, paths) -> None:
    ctx.files.extend(paths if isinstance(paths, list) else [paths])


def _savez(path, **arrays):
    from hetero.utils.files import atomic_write

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    return atomic_write(path, write)


def pseudo_atoms(ctx) -> None:
    """Consensus pseudo-atoms of both half sets: markers, PDB and map."""
    from hetero.analysis.volumes import resample_to_box
    from hetero.data.io.mrc import write_volume

    model = _model(ctx)
    out = ctx.out / "dynamight"
    rows = []
    for h, vae in enumerate(model.halves):
        c = vae.consensus
        pos = c.positions_angstrom().detach().cpu().numpy()
        sigma = c.sigma_angstrom().detach().cpu().numpy()
        amp = c.amplitudes().detach().cpu().numpy()
        xyz = _frame(ctx, pos)
        name = f"consensus_half{h + 1}"
        _write(ctx, A.write_markers(out / f"{name}.cmm", xyz, sigma, A.value_colors(amp), name))
        _write(ctx, A.write_pdb(out / f"{name}.pdb", xyz, bfactors=sigma, occupancies=amp / amp.max()))
        with torch.no_grad():  # the consensus itself (not deformed), in decode()'s units
            vol = c.rasterize(model.template_size)[None] * (model.box_size / model.template_size)
        vol = resample_to_box(vol.cpu(), model.template_voxel_size(), ctx.box, ctx.apix)[0]
        _write(ctx, write_volume(out / f"{name}.mrc", vol.numpy(), ctx.apix))
        rows.append((f"half set {h + 1}", len(pos), float(np.mean(sigma)), float(np.median(amp))))
    ctx.metrics.setdefault("dynamight", {})["n_gaussians"] = [r[1] for r in rows]
    ctx.section(SECTION).append(R.table(rows, ["consensus", "Gaussians", "mean sigma (Å)", "median amplitude"]))


def deformations(ctx) -> None:
    """Deformation magnitude, displacements along PCs and between cluster centres, marker series."""
    model = _model(ctx)
    pp = ctx.result.per_particle
    out = ctx.out / "dynamight"
    blocks = ctx.section(SECTION)
    half = model.decode_half
    metrics = ctx.metrics.setdefault("dynamight", {})
    if "deformation_rmsd" in pp:
        summary = A.deformation_summary(pp["deformation_rmsd"], pp.get("deformation_max"))
        metrics["deformation"] = summary
        blocks.append(R.table([(k.replace("_", " ") + " (Å)", v) for k, v in summary.items()],
                              ["deformation over the data set (own half set's decoder)", "value"]))
    consensus = model.halves[half].consensus.positions_angstrom().detach().cpu().numpy()

    def deform(z: np.ndarray) -> np.ndarray:
        chunks = [model.deformed_angstrom(torch.as_tensor(z[i : i + 64]), half).cpu().numpy()
                  for i in range(0, len(z), 64)]
        return np.concatenate(chunks)

    pcs = ctx.state.get("pca")
    if pcs is not None and ctx.result.embedding_dim > 0:
        n_sigma = float(_opt(ctx, "pc_sigma", 2.0))
        disp = A.pc_displacements(deform, pcs.mean, pcs.components, np.sqrt(pcs.explained_variance), n_sigma)
        rows = []
        for k, d in enumerate(disp):
            mag = np.linalg.norm(d, axis=-1)
            stem = out / "displacements" / f"pc{k + 1}"
            _write(ctx, [_savez(stem.with_suffix(".npz"), displacement=d, consensus=consensus),
                         A.write_markers(stem.with_suffix(".cmm"), _frame(ctx, consensus), 2.0,
                                         A.value_colors(mag), f"PC{k + 1} displacement"),
                         A.write_pdb(stem.with_suffix(".pdb"), _frame(ctx, consensus), bfactors=mag)])
            rows.append((f"PC{k + 1}", float(mag.mean()), float(mag.max())))
        metrics["pc_displacement_mean"] = [r[1] for r in rows]
        blocks.append(R.table(rows, [f"Gaussian displacement over +-{n_sigma:g} sd", "mean (Å)", "max (Å)"]))
        _pc_series(ctx, pcs, deform, out)
    km = ctx.state.get("clusters")
    if km is not None and ctx.result.embedding_dim > 0:
        res = A.centre_displacements(deform, ctx.result.embedding[km.center_indices], consensus)
        _write(ctx, _savez(out / "clusters.npz", **res))
        for i, pos in enumerate(res["positions"]):
            mag = np.linalg.norm(res["from_consensus"][i], axis=-1)
            _write(ctx, A.write_markers(out / "clusters" / f"cluster_{i:03d}.cmm", _frame(ctx, pos), 2.0,
                                        A.value_colors(mag, 0.0), f"cluster {i}"))
        metrics["cluster_rmsd"] = res["rmsd"].tolist()
        blocks.append(R.paragraph(
            f"RMS distance between the Gaussians of the {len(res['rmsd'])} cluster centres: up to "
            f"{res['rmsd'].max():.2f} Å (clusters.npz: positions, displacement from the consensus, "
            "pairwise RMSD)."))


def _pc_series(ctx, pcs, deform, out) -> None:
    from hetero.analysis import latent as L

    trav = ctx.cfg.get("pc_traversal") or {}
    steps = int(_opt(ctx, "marker_steps", trav.get("steps", 10)))
    lo, hi = float(trav.get("low_percentile", 5)), float(trav.get("high_percentile", 95))
    for k in range(min(int(ctx.cfg.get("n_pc_traversals", 2)), pcs.n_components)):
        pts = L.pc_traversal(pcs, k, steps, lo, hi)
        frames = _frame(ctx, deform(pts.astype(np.float32)))
        moved = np.linalg.norm(frames - frames[len(frames) // 2], axis=-1)
        colors = np.stack([A.value_colors(m, 0.0, max(float(moved.max()), 1e-6)) for m in moved])
        _write(ctx, A.write_marker_series(out / "markers" / f"pc{k + 1}", frames, f"pc{k + 1}", colors,
                                          movie=f"pc{k + 1}_markers.mp4"))
        maps = sorted((ctx.out / "maps" / "decoded" / f"pc{k + 1}").glob(f"pc{k + 1}_*.mrc"))
        if maps:
            from hetero.analysis.volumes import contour_level
            from hetero.data.io.mrc import read_volume

            level = contour_level(np.stack([read_volume(p)[0] for p in maps[:: max(1, len(maps) // 3)]]))
            _write(ctx, A.write_map_movie_script(out / "movies" / f"pc{k + 1}_maps.cxc", maps, level,
                                                 f"pc{k + 1}_maps.mp4"))


def half_set_error(ctx) -> None:
    """Per-Gaussian disagreement of the half sets' deformations of the validation particles."""
    model = _model(ctx)
    pp = ctx.result.per_particle
    blocks = ctx.section(SECTION)
    if not {"validation", "z_mu_half1", "z_mu_half2"} <= set(pp):
        blocks.append(R.paragraph("No validation latents of both half sets: no half-set error.", "note"))
        return
    idx = np.flatnonzero(np.asarray(pp["validation"], dtype=bool))
    cap = int(_opt(ctx, "max_validation_particles", 2000))
    if len(idx) > cap:
        idx = np.sort(np.random.default_rng(0).choice(idx, cap, replace=False))
    if len(idx) < 2:
        blocks.append(R.paragraph("Fewer than two validation particles: no half-set error.", "note"))
        return
    ref = model.halves[0].consensus.positions_angstrom().detach()
    da, db = [], []
    for s in range(0, len(idx), 64):
        sel = idx[s : s + 64]
        da.append(model.displacement_field(torch.as_tensor(pp["z_mu_half1"][sel]), ref, 0).cpu().numpy())
        db.append(model.displacement_field(torch.as_tensor(pp["z_mu_half2"][sel]), ref, 1).cpu().numpy())
    res = A.half_set_disagreement(np.concatenate(da), np.concatenate(db))
    out = ctx.out / "dynamight" / "half_set_error"
    pos = ref.cpu().numpy()
    xyz = _frame(ctx, pos)
    dis = res["rms_difference"]
    npz = _savez(out / "disagreement.npz", **res, positions=pos, validation_indices=idx)
    sigma = float(model.halves[0].consensus.sigma_angstrom().detach().mean()) * 1.5
    values = A.write_value_map(out / "disagreement.mrc", pos, dis, sigma, ctx.box, ctx.apix)
    density = ctx.out / "dynamight" / "consensus_half1.mrc"
    if not density.is_file():
        pseudo_atoms(ctx)
    from hetero.analysis.volumes import contour_level
    from hetero.data.io.mrc import read_volume

    level = contour_level(read_volume(density)[0][None])
    vmax = float(np.percentile(dis, 99))
    files = [npz, values,
             A.write_markers(out / "disagreement.cmm", xyz, 2.0, A.value_colors(dis, 0.0, vmax), "disagreement"),
             A.write_pdb(out / "disagreement.pdb", xyz, bfactors=dis),
             A.write_color_by_map_script(out / "disagreement.cxc", density, values, level, 0.0, vmax)]
    fig = A.disagreement_figure(ctx.fig_dir / "dynamight_half_set_error.png", pos, dis, res["rms_displacement"])
    _write(ctx, [*files, fig])
    ctx.metrics.setdefault("dynamight", {})["half_set_error"] = {
        "validation_particles": int(len(idx)), "mean": float(dis.mean()), "median": float(np.median(dis)),
        "max": float(dis.max()), "mean_displacement": float(res["rms_displacement"].mean())}
    blocks.append(R.image(fig, "Half-set disagreement of the displacements per Gaussian (validation "
                               "particles, both half sets' fields at half set 1's consensus)"))
    blocks.append(R.paragraph(
        f"Mean disagreement {dis.mean():.2f} Å (max {dis.max():.2f} Å) against a mean RMS displacement "
        f"of {res['rms_displacement'].mean():.2f} Å over {len(idx)} validation particles. Open "
        "dynamight/half_set_error/disagreement.cxc in ChimeraX (from that folder) for the consensus "
        "map coloured by it."))
