"""The analysis task behind ``analyze.py``: a trained run -> maps, subsets, figures, report.

Output folder (``cfg.output_dir``, default ``<run_dir>/analysis``)::

    report.html                  one self-contained page (figures embedded)
    metrics.json                 latent statistics, cluster sizes, ground-truth scores
    latent/                      pca_coords.npy, pca_components.npz, umap.npy
    clusters/                    labels.npy (N,), center_indices.npy (K,), counts.csv
    maps/clusters/               cluster_000.mrc ... at the original box and pixel size + .cxc
    maps/pc1/ ...                PC traversals (pc1_000.mrc ...) + .cxc
    maps/truth_states/           maps at each true state's snapped mean latent (ground truth)
    subsets/                     cluster_000.star / .npy / .txt ...
    figures/                     the PNGs of the report
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)


# ----------------------------------------------------------------------------- helpers
def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
    )


def _read_volume(path: str | Path) -> tuple[np.ndarray, float]:
    try:
        from hetero.data.io.mrc import read_volume
    except ImportError:
        import mrcfile

        with mrcfile.open(path, permissive=True) as mrc:
            return np.asarray(mrc.data, dtype=np.float32), float(mrc.voxel_size.x)
    vol, apix = read_volume(path)
    return np.asarray(vol, dtype=np.float32), float(apix)


def _on_original_grid(volumes: np.ndarray, apix: float, box: int, original_apix: float):
    import torch

    from hetero.analysis.volumes import resample_to_box

    return resample_to_box(torch.from_numpy(np.array(volumes, dtype=np.float32)), apix, box, original_apix)


def load_ground_truth(cfg: DictConfig, datamodule, n_particles: int, box: int, apix: float) -> dict | None:
    """Ground truth from ``cfg.truth`` (user files) or the synthetic data module's truth dir.

    :return: ``None`` or a dict with any of ``labels`` (N,), ``t`` (N,) or (N, P), ``volumes``
        (K, D, D, D) torch on the original grid, ``kind``, ``source``.
    """
    truth: dict[str, Any] = {}
    user = cfg.get("truth")
    if user:
        truth["source"] = "user (+truth)"
        if user.get("labels"):
            truth["labels"] = np.load(str(user.labels)).astype(np.int64).ravel()
        if user.get("t"):
            truth["t"] = np.load(str(user.t)).astype(np.float64)
        if user.get("volumes"):
            vols = []
            for p in user.volumes:
                vol, vapix = _read_volume(str(p))
                vols.append(_on_original_grid(vol[None], vapix, box, apix)[0])
            import torch

            truth["volumes"] = torch.stack(vols)
        truth["kind"] = user.get("kind") or ("continuous" if "t" in truth and "labels" not in truth else "discrete")
    else:
        truth_dir = getattr(datamodule, "truth_dir", None) if datamodule is not None else None
        if not truth_dir:
            return None
        from hetero.data.synthetic import SyntheticDataset, load_truth

        raw = load_truth(truth_dir)
        truth["source"] = f"synthetic ({truth_dir})"
        truth["kind"] = str(raw.get("kind", "discrete"))
        for key in ("labels", "t", "t_grid"):
            if raw.get(key) is not None:
                truth[key] = np.asarray(raw[key])
        particles = getattr(datamodule, "particles", None)
        if cfg.get("oracle", True) and isinstance(particles, SyntheticDataset):
            truth["dataset"] = particles  # for the oracle classifier (the ceiling of ARI)
        if raw.get("volumes") is not None:
            vapix = float(raw.get("apix", apix))
            truth["volumes"] = _on_original_grid(np.asarray(raw["volumes"]), vapix, box, apix)
    for key in ("labels", "t"):
        if key in truth and len(truth[key]) != n_particles:
            raise ValueError(
                f"ground truth {key} has {len(truth[key])} rows but the run has {n_particles} particles"
            )
    if "labels" not in truth and "t" in truth and "volumes" in truth:
        # Continuous truth: volume i was rendered at t_grid[i] (evenly spaced over the range of t
        # unless the truth says otherwise); each particle's state is the nearest grid point.
        t = np.asarray(truth["t"], dtype=np.float64).reshape(n_particles, -1)[:, 0]
        k = len(truth["volumes"])
        grid = np.asarray(truth.get("t_grid", np.linspace(t.min(), t.max(), k)), dtype=np.float64)
        truth["labels"] = np.argmin(np.abs(t[:, None] - grid[None, :]), axis=1)
        truth["labels_from_t"] = True
    if "labels" in truth and "volumes" in truth:
        n_states = len(truth["volumes"])
        if truth["labels"].max() >= n_states or truth["labels"].min() < 0:
            raise ValueError(f"ground truth labels must be in 0..{n_states - 1} (one per volume)")
    return truth


# ----------------------------------------------------------------------------- the task
def analyze(cfg: DictConfig) -> dict[str, Any]:
    """Run the analysis of ``cfg.run_dir``; returns the metrics dict (also in metrics.json)."""
    import torch

    from hetero.analysis import latent as L
    from hetero.analysis import plots as P
    from hetero.analysis import report as R
    from hetero.analysis.rundir import RunDir
    from hetero.analysis.subsets import cluster_subsets, write_subset
    from hetero.analysis.volumes import (
        contour_level,
        decode_volumes,
        resample_to_box,
        write_chimerax_script,
        write_maps,
    )
    from hetero.utils.files import write_json, write_npy, write_text

    start = time.perf_counter()
    if OmegaConf.is_missing(cfg, "run_dir"):
        raise ValueError("run_dir is required: python analyze.py run_dir=<training run directory>")
    run = RunDir.open(cfg.run_dir, cfg.get("checkpoint", "best"))
    out = Path(str(cfg.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "analyze_config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    fig_dir = out / "figures"
    info = run.info
    box, apix = int(info["original_box"]), float(info["original_apix"])
    device = str(cfg.maps.get("device", "cpu"))
    batch_size = int(cfg.maps.get("batch_size", 4))
    log.info(f"Analysing {run.path} (checkpoint {run.checkpoint.name}) -> {out}")

    if cfg.get("data"):
        with_data = OmegaConf.merge(run.cfg.data, cfg.data)
        run.cfg.data = with_data
    model = run.load_model(device)
    voxel = float(model.template_voxel_size())

    # ---------------------------------------------------------------- data + latents
    datamodule = None
    try:
        datamodule = run.datamodule()
    except Exception as err:
        log.warning(f"could not set up the data module ({type(err).__name__}: {err}); "
                    "subsets and synthetic ground truth are skipped")
    latents = None if cfg.get("recompute_latents") else run.latents()
    if latents is None:
        if datamodule is None:
            raise RuntimeError(
                f"{run.latents_dir / 'z_mu.npy'} is missing and the data could not be loaded to "
                "compute it; fix the data paths (e.g. +data.datadir=...) and run again"
            )
        from hetero.tasks.inference import encode_particles, write_latents

        log.info("Latents missing: encoding all particles")
        latents = encode_particles(model, datamodule.predict_dataloader(), torch.device(device),
                                   progress=bool(cfg.progress))
        write_latents(run.latents_dir, latents, model)
        model.to(device).eval()
    z = np.asarray(latents["z_mu"], dtype=np.float32)
    n, zdim = z.shape
    table = getattr(datamodule, "table", None) if datamodule is not None else None
    if table is not None and len(table) != n:
        log.warning(f"data has {len(table)} particles but latents {n}; subsets are skipped")
        table = None

    metrics: dict[str, Any] = {
        "run_dir": str(run.path),
        "checkpoint": str(run.checkpoint),
        "n_particles": n,
        "latent_dim": zdim,
        "original_box": box,
        "original_apix": apix,
        "template_size": int(round(box * apix / voxel)),
        "template_voxel_size": voxel,
    }
    sections: dict[str, list[str]] = {k: [] for k in R.SECTION_ORDER}
    files: list[Path] = []
    map_blocks: list[str] = []
    progress = _progress(bool(cfg.progress))

    with progress:
        def decode_to_original(points: np.ndarray, desc: str | None):
            """Decode and resample to the original grid; a progress bar unless ``desc`` is None."""
            bar = progress if desc else None
            vols = decode_volumes(model, points, batch_size, device, bar, desc or "")
            return resample_to_box(vols, voxel, box, apix)

        def write_series(name: str, vols, prefix: str, play: bool) -> list[Path]:
            folder = out / "maps" / name
            paths = write_maps(folder, vols, apix, prefix)
            level = contour_level(vols, float(cfg.maps.get("contour_fraction", 0.05)))
            script = write_chimerax_script(folder / f"{name}.cxc", paths, level, play=play)
            files.extend([*paths, script])
            return paths

        pcs = km = emb = None
        cluster_vols = None
        if zdim == 0:
            log.info("Latent dimension 0 (homogeneous model): writing the consensus map only")
            consensus = decode_to_original(np.zeros((1, 0), np.float32), "Decoding consensus map")
            cluster_vols = consensus
            if cfg.maps.enabled:
                write_series("consensus", consensus, "consensus", play=False)
        else:
            # ------------------------------------------------------------ latent space
            k = int(cfg.n_clusters)
            if k > n:
                raise ValueError(f"n_clusters={k} is larger than the number of particles ({n})")
            pcs = L.pca(z, int(cfg.pca_components))
            write_npy(out / "latent" / "pca_coords.npy", pcs.coords.astype(np.float32))
            np.savez(out / "latent" / "pca_components.npz", mean=pcs.mean, components=pcs.components,
                     explained_variance=pcs.explained_variance,
                     explained_variance_ratio=pcs.explained_variance_ratio)
            metrics["pca_explained_variance_ratio"] = [float(v) for v in pcs.explained_variance_ratio]
            task = progress.add_task(f"k-means (K={k})", total=None)
            km = L.kmeans(z, k, seed=int(cfg.kmeans.seed), n_init=int(cfg.kmeans.n_init))
            progress.update(task, total=1, completed=1)
            write_npy(out / "clusters" / "labels.npy", km.labels)
            write_npy(out / "clusters" / "center_indices.npy", km.center_indices)
            write_text(out / "clusters" / "counts.csv", "cluster,particles,center_index\n" + "".join(
                f"{i},{c},{j}\n" for i, (c, j) in enumerate(zip(km.counts, km.center_indices))))
            files += [out / "clusters" / "labels.npy", out / "clusters" / "center_indices.npy",
                      out / "clusters" / "counts.csv", out / "latent" / "pca_coords.npy"]
            metrics["clusters"] = {"k": k, "counts": km.counts.tolist(),
                                   "center_indices": km.center_indices.tolist()}
            if cfg.umap.enabled and n >= 4:
                task = progress.add_task(f"UMAP ({n} particles)", total=None)
                emb = L.umap_embedding(z, cfg.umap.n_neighbors, cfg.umap.min_dist,
                                       cfg.umap.get("max_points"), int(cfg.umap.seed))
                progress.update(task, total=1, completed=1)
                write_npy(out / "latent" / "umap.npy", emb)
                files.append(out / "latent" / "umap.npy")

            # ------------------------------------------------------------ maps
            if cfg.maps.enabled:
                cluster_vols = decode_to_original(z[km.center_indices], f"Decoding {k} cluster maps")
                write_series("clusters", cluster_vols, "cluster", play=False)
                n_trav = min(int(cfg.n_pc_traversals), pcs.n_components)
                trav_figs = []
                for pc in range(n_trav):
                    pts = L.pc_traversal(pcs, pc, int(cfg.pc_traversal.steps),
                                         float(cfg.pc_traversal.low_percentile),
                                         float(cfg.pc_traversal.high_percentile))
                    vols = decode_to_original(pts, f"Decoding PC{pc + 1} traversal")
                    write_series(f"pc{pc + 1}", vols, f"pc{pc + 1}", play=True)
                    trav_figs.append(P.map_gallery(fig_dir / f"pc{pc + 1}_maps.png", vols.numpy(),
                                                   [f"PC{pc + 1} #{i}" for i in range(len(vols))]))
                map_blocks += [R.image(p, p.stem.replace("_", " ")) for p in trav_figs]

            # ------------------------------------------------------------ subsets
            if cfg.subsets.enabled and table is not None:
                subsets = cluster_subsets(km.labels, cfg.subsets.get("clusters"))
                task = progress.add_task("Writing particle subsets", total=len(subsets))
                for name, idx in subsets.items():
                    files += list(write_subset(out / "subsets", name, table, idx).values())
                    progress.advance(task)
                metrics["subsets"] = {name: int(len(idx)) for name, idx in subsets.items()}

        # ---------------------------------------------------------------- ground truth
        truth = load_ground_truth(cfg, datamodule, n, box, apix)
        gt_blocks: list[str] = []
        if truth is not None:
            gt = _ground_truth_metrics(cfg, truth, z, decode_to_original, write_series, progress, fig_dir,
                                       box, apix, consensus=cluster_vols if zdim == 0 else None)
            metrics["ground_truth"] = gt.pop("_metrics")
            gt_blocks = gt["blocks"]

    # -------------------------------------------------------------------- figures + report
    sections["Summary"] = [R.table(_summary_rows(metrics, run, info, time.perf_counter() - start))]
    loss_png = P.loss_curves(fig_dir / "loss.png", run.metrics_csv)
    sections["Training"] = (
        [R.image(loss_png, "Loss terms (Lightning CSV log)")] if loss_png
        else [R.paragraph(f"No CSV training log at {run.metrics_csv}.", "note")]
    )
    train_metrics = run.path / "train_metrics.json"
    if train_metrics.is_file():
        import json

        tm = json.loads(train_metrics.read_text())
        sections["Training"].append(R.table(sorted((k, v) for k, v in tm.items()), ["metric", "value"]))
    if km is not None:
        lat = [R.image(P.explained_variance(fig_dir / "pca_variance.png", pcs.explained_variance_ratio),
                       "PCA explained variance")]
        if pcs.n_components >= 2:
            pc_xy = pcs.coords[:, :2]
            lat.append(R.image(P.scatter_by_cluster(fig_dir / "pca_clusters.png", pc_xy, km.labels,
                                                    pc_xy[km.center_indices], "PCA by cluster",
                                                    ("PC1", "PC2")), "PC1/PC2 coloured by cluster"))
            lat.append(R.image(P.hexbin_density(fig_dir / "pca_density.png", pc_xy, "PCA density",
                                                ("PC1", "PC2")), "PC1/PC2 particle density"))
        if emb is not None:
            lat.append(R.image(P.scatter_by_cluster(fig_dir / "umap_clusters.png", emb, km.labels,
                                                    emb[km.center_indices], "UMAP by cluster",
                                                    ("UMAP1", "UMAP2")), "UMAP coloured by cluster"))
            lat.append(R.image(P.hexbin_density(fig_dir / "umap_density.png", emb, "UMAP density",
                                                ("UMAP1", "UMAP2")), "UMAP particle density"))
            if truth is not None and "t" in truth:
                t0 = np.asarray(truth["t"]).reshape(n, -1)[:, 0]
                lat.append(R.image(P.scatter_by_value(fig_dir / "umap_truth.png", emb, t0,
                                                      "UMAP by true parameter", "t", ("UMAP1", "UMAP2")),
                                   "UMAP coloured by the ground-truth parameter"))
        lat.append(R.table([(f"PC{i + 1}", float(v)) for i, v in enumerate(pcs.explained_variance_ratio)],
                           ["component", "explained variance ratio"]))
        sections["Latent space"] = lat
        sections["Clusters"] = [
            R.image(P.cluster_sizes(fig_dir / "cluster_sizes.png", km.counts), "Particles per cluster"),
            R.table([(i, int(c), f"{100 * c / n:.1f}%", int(j)) for i, (c, j)
                     in enumerate(zip(km.counts, km.center_indices))],
                    ["cluster", "particles", "fraction", "centre particle"]),
        ]
    else:
        sections["Latent space"] = [R.paragraph("The model has no latent space (homogeneous).", "note")]
    if cluster_vols is not None:
        names = [f"cluster {i}" for i in range(len(cluster_vols))] if km is not None else ["consensus"]
        gallery = P.map_gallery(fig_dir / "cluster_maps.png", cluster_vols.numpy(), names)
        sections["Maps"] = [
            R.paragraph(f"Maps at {box} px, {apix:.4g} Å/px (origin 0). Open a series in ChimeraX "
                        "with the .cxc script in its folder, e.g. `cd maps/clusters; open clusters.cxc`."),
            R.image(gallery, "Central slices and projections of each cluster map"),
            *map_blocks,
        ]
    if truth is not None and "labels" in truth and km is not None:
        xy, axes = (emb, ("UMAP1", "UMAP2")) if emb is not None else (pcs.coords[:, :2], ("PC1", "PC2"))
        if xy.shape[1] == 2:
            gt_blocks.insert(1, R.image(P.scatter_by_cluster(fig_dir / "truth_labels.png", xy, truth["labels"],
                                                             title="Latents by true state", axis_labels=axes),
                                        "Latent embedding coloured by the true state"))
    sections["Ground truth"] = gt_blocks
    metrics["time_seconds"] = time.perf_counter() - start
    metrics_path = write_json(out / "metrics.json", _finite(metrics))
    files.append(metrics_path)
    files += sorted(fig_dir.glob("*.png"))
    sections["Files"] = [R.paragraph(f"All paths relative to {out}."), R.file_list(out, _compact(files, out))]
    report = R.write_report(out / "report.html", "hetero analysis", sections,
                            subtitle=f"{run.path} · {run.checkpoint.name}")
    _print_summary(metrics, report)
    return metrics


def _ground_truth_metrics(cfg, truth, z, decode_to_original, write_series, progress, fig_dir, box, apix,
                          consensus=None):
    """ARI/AMI, per-state and per-image FSC, neighbourhood similarity; returns report blocks."""
    import torch

    from hetero.analysis import metrics as M
    from hetero.analysis import plots as P
    from hetero.analysis import report as R

    n, zdim = z.shape
    gt: dict[str, Any] = {"source": truth.get("source"), "kind": truth.get("kind")}
    blocks = [R.paragraph(f"Ground truth: {truth.get('source')} ({truth.get('kind')}).")]
    labels = truth.get("labels")
    vols = truth.get("volumes")
    if truth.get("labels_from_t"):
        gt["labels_from_t"] = True
        blocks.append(R.paragraph("States assigned from the continuous parameter (nearest volume).", "note"))
    if labels is not None and zdim > 0 and len(np.unique(labels)) >= 2 and not truth.get("labels_from_t"):
        scores = M.clustering_scores(z, labels, seed=int(cfg.kmeans.seed))
        gt["ari"], gt["ami"], gt["k_true"] = scores["ari"], scores["ami"], scores["k"]
        rows = [("ARI", scores["ari"]), ("AMI", scores["ami"]), ("k (true states)", scores["k"])]
        if truth.get("dataset") is not None:
            from hetero.data.synthetic.oracle import oracle_assignment

            oracle = oracle_assignment(truth["dataset"])
            gt["oracle_ari"], gt["oracle_ami"] = oracle["ari"], oracle["ami"]
            gt["oracle_accuracy"] = oracle["accuracy"]
            if oracle["ari"] > 0:
                gt["ari_fraction_of_oracle"] = scores["ari"] / oracle["ari"]
            rows += [("oracle ARI (true pose, CTF and noise model; best-fitting state)", oracle["ari"]),
                     ("oracle accuracy", oracle["accuracy"])]
            if "ari_fraction_of_oracle" in gt:
                rows.append(("ARI / oracle ARI", gt["ari_fraction_of_oracle"]))
        blocks.append(R.table(rows, ["clustering (k-means, k = true states)", "value"]))
    if labels is not None and vols is not None:
        # Per state: decode at the particle nearest the state's mean latent.
        states = np.unique(labels)
        if zdim > 0:
            reps = M.state_representatives(z, labels)
            maps = decode_to_original(z[[reps[int(s)] for s in states]], "Decoding true-state maps")
        else:
            reps = {int(s): -1 for s in states}
            if consensus is None:
                consensus = decode_to_original(np.zeros((1, 0), np.float32), "Decoding consensus map")
            maps = consensus[:1].expand(len(states), -1, -1, -1)
        if cfg.maps.enabled:
            write_series("truth_states", maps, "state", play=False)
        per_state, curves = [], {}
        for i, s in enumerate(states):
            row = M.fsc_summary(maps[i], vols[int(s)], apix)
            curves[f"state {int(s)}"] = row.pop("curve")
            per_state.append({"state": int(s), "particle": reps[int(s)],
                              "n_particles": int(np.sum(labels == s)), **row})
        aucs = np.array([r["auc"] for r in per_state])
        gt["per_state_fsc"] = per_state
        gt["per_state_auc_mean"] = float(aucs.mean())
        gt["per_state_res_0.5_mean"] = float(np.mean([r["res_0.5"] for r in per_state]))
        gt["per_state_res_0.143_mean"] = float(np.mean([r["res_0.143"] for r in per_state]))
        gt["auc_ceiling"] = (box // 2 - 1) / box
        blocks.append(R.image(P.fsc_curves(fig_dir / "fsc_states.png", curves, box, apix,
                                           "FSC: map at each state's mean latent vs true volume"),
                              "Per-state FSC against the ground-truth volumes"))
        blocks.append(R.table([(r["state"], r["n_particles"], r["particle"], r["auc"], r["res_0.5"],
                                r["res_0.143"]) for r in per_state],
                              ["state", "particles", "decoded at particle", "FSC AUC", "FSC=0.5 (Å)",
                               "FSC=0.143 (Å)"]))
        # CryoBench per-image FSC.
        idx = M.per_image_sample(n, int(cfg.per_image_fsc_samples))
        if zdim > 0 and len(idx):
            aucs_img = []
            bs = max(1, int(cfg.maps.batch_size))
            task = progress.add_task(f"Per-image FSC ({len(idx)} images)", total=len(idx))
            for startb in range(0, len(idx), bs):
                chunk = idx[startb : startb + bs]
                pred = decode_to_original(z[chunk], None)
                aucs_img += M.fsc_aucs(pred, vols[torch.as_tensor(labels[chunk], dtype=torch.long)])
                progress.advance(task, len(chunk))
            aucs_img = np.array(aucs_img)
            gt["per_image_fsc_auc_mean"] = float(aucs_img.mean())
            gt["per_image_fsc_auc_std"] = float(aucs_img.std())
            gt["per_image_fsc_n"] = int(len(aucs_img))
            blocks.append(R.table([("images", len(aucs_img)), ("mean FSC AUC", float(aucs_img.mean())),
                                   ("std", float(aucs_img.std())), ("ceiling (identical maps)", gt["auc_ceiling"])],
                                  ["per-image FSC (CryoBench)", "value"]))
    t = truth.get("t")
    if t is not None and zdim > 0:
        m = min(n, int(cfg.neighbourhood_max_points))
        sims = M.neighbourhood_scores(z, t, cfg.neighbourhood_fractions, m, seed=int(cfg.seed))
        gt["neighbourhood_similarity"] = sims
        blocks.append(R.table([(f, v["k"], v["similarity"], min(1.0, v["k"] / max(m - 1, 1)))
                               for f, v in sims.items()],
                              ["k / N", "k", "neighbourhood similarity", "random baseline"]))
    return {"_metrics": gt, "blocks": blocks}


def _summary_rows(metrics: dict, run, info: dict, seconds: float) -> list[tuple]:
    rows = [
        ("run directory", str(run.path)),
        ("checkpoint", run.checkpoint.name),
        ("model", str(run.cfg.model.get("_target_", "?")).rsplit(".", 1)[-1]),
        ("particles", metrics["n_particles"]),
        ("latent dimension", metrics["latent_dim"]),
        ("original box / pixel size", f"{info['original_box']} px, {float(info['original_apix']):.4g} Å/px"),
        ("training box / pixel size", f"{info['box_size']} px, {float(info['apix']):.4g} Å/px"),
        ("decoder template", f"{metrics['template_size']} px, {metrics['template_voxel_size']:.4g} Å/voxel"),
    ]
    if "clusters" in metrics:
        counts = metrics["clusters"]["counts"]
        rows.append(("clusters", f"{len(counts)} (sizes {min(counts)} to {max(counts)})"))
    gt = metrics.get("ground_truth") or {}
    for key, label in (("ari", "ARI"), ("ami", "AMI"), ("oracle_ari", "oracle ARI (ceiling)"),
                       ("ari_fraction_of_oracle", "ARI / oracle ARI"),
                       ("per_state_auc_mean", "per-state FSC AUC (mean)"),
                       ("per_state_res_0.5_mean", "per-state FSC=0.5 (Å, mean)"),
                       ("per_image_fsc_auc_mean", "per-image FSC AUC (mean)")):
        if key in gt:
            rows.append((label, float(gt[key])))
    for v in (gt.get("neighbourhood_similarity") or {}).values():
        rows.append((f"neighbourhood similarity (k = {v['k']})", float(v["similarity"])))
    rows.append(("analysis time", f"{seconds:.1f} s"))
    return rows


def _finite(obj):
    """JSON-safe copy: non-finite floats become strings ("inf")."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, float | np.floating) and not math.isfinite(float(obj)):
        return str(float(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _compact(files: list[Path], root: Path, per_folder: int = 6) -> list[Path]:
    """At most ``per_folder`` entries per folder (plus the folder itself when cut)."""
    by_folder: dict[Path, list[Path]] = {}
    for f in dict.fromkeys(Path(p) for p in files):
        by_folder.setdefault(f.parent, []).append(f)
    out: list[Path] = []
    for folder, items in by_folder.items():
        if len(items) > per_folder:
            out += [*items[: per_folder - 1], folder]
        else:
            out += items
    return out


def _print_summary(metrics: dict, report: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="hetero analysis", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("particles", str(metrics["n_particles"]))
    table.add_row("latent dimension", str(metrics["latent_dim"]))
    if "clusters" in metrics:
        table.add_row("clusters", str(metrics["clusters"]["k"]))
    gt = metrics.get("ground_truth") or {}
    for key in ("ari", "ami", "oracle_ari", "ari_fraction_of_oracle", "per_state_auc_mean",
                "per_state_res_0.5_mean", "per_state_res_0.143_mean", "per_image_fsc_auc_mean"):
        if key in gt:
            table.add_row(key, f"{float(gt[key]):.4g}")
    for v in (gt.get("neighbourhood_similarity") or {}).values():
        table.add_row(f"neighbourhood_similarity@{v['k']}", f"{v['similarity']:.4g}")
    console = Console()
    console.print(table)
    console.print(f"Report: [bold]{report}[/bold]")
