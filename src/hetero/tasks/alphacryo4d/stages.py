"""The AlphaCryo4D stages other than volume resampling (see :mod:`.pipeline`).

Each stage is ``fn(ctx) -> (summary, outputs)``: ``summary`` a small JSON-able dict for
``pipeline.json`` and the report, ``outputs`` the files it wrote (its record is valid while
they exist). Arrays are written atomically; every row order follows the volume manifest
(``resampling/members.npz``), which follows the union order of ``shuffling/unions.npz``.
"""

from __future__ import annotations

import numpy as np

from hetero.models.alphacryo4d.io import (
    load_members,
    load_volumes_info,
    stage_paths,
)
from hetero.utils.files import write_json, write_npy
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)


# ----------------------------------------------------------------------------- 1. shuffling
def shuffling(ctx):
    """M-fold unions of the consensus particles (every particle in exactly M unions)."""
    from hetero.models.alphacryo4d.shuffling import leave_one_out, shuffle_unions

    s = ctx.mcfg.shuffling
    n = int(ctx.datamodule().info()["n_particles"])
    if s.scheme == "leave_one_out":
        shuffle = leave_one_out(n, int(s.fold), int(s.seed), s.get("batch_size"))
    elif s.scheme == "bootstrap":
        shuffle = shuffle_unions(n, int(s.n_subsets), int(s.window), int(s.seed), s.get("batch_size"))
    else:
        raise ValueError(f"alphacryo4d.shuffling.scheme must be leave_one_out or bootstrap, got {s.scheme!r}")
    paths = stage_paths(ctx.root)
    if ctx.is_global_zero:
        from hetero.utils.files import atomic_write

        width = max(4, len(str(shuffle.n_unions)))
        unions = {f"union_{u:0{width}d}": idx for u, idx in enumerate(shuffle.unions)}
        atomic_write(paths["unions"], lambda p: np.savez(p, **unions))
        atomic_write(
            paths["shuffle"],
            lambda p: np.savez(p, union_batch=shuffle.union_batch, group=shuffle.group, batch=shuffle.batch,
                               votes_per_particle=shuffle.votes_per_particle, seed=shuffle.seed),
        )
    sizes = [len(u) for u in shuffle.unions]
    summary = {"n_particles": n, "n_unions": shuffle.n_unions, "votes_per_particle": shuffle.votes_per_particle,
               "union_size_min": min(sizes), "union_size_max": max(sizes),
               "n_batches": int(shuffle.union_batch.max()) + 1}
    log.info(f"{n} particles -> {shuffle.n_unions} unions of {min(sizes)}-{max(sizes)}; each particle in "
             f"{shuffle.votes_per_particle}")
    return summary, [paths["unions"], paths["shuffle"]]


# ----------------------------------------------------------------------------- 3. autoencoder
def autoencoder(ctx):
    """Train the residual autoencoder on the kept volumes; features from the best checkpoint
    (by held-out loss) in eval mode."""
    import hydra
    import lightning as L
    import torch

    from hetero.data.volumes import VolumeDataModule
    from hetero.models.alphacryo4d.module import extract_features
    from hetero.tasks.alphacryo4d.pipeline import best_checkpoint

    a = ctx.mcfg.autoencoder
    paths = stage_paths(ctx.root)
    info = load_volumes_info(ctx.root)
    kept = load_members(ctx.root)["kept"]
    factor = 4 * int(ctx.cfg.model.get("first_stride", 1))
    if info["box_size"] % factor:
        raise ValueError(
            f"the autoencoder halves the volume side {2 if factor == 4 else 3} times: the volumes "
            f"({info['box_size']} px) must have a side divisible by {factor}; set data.box_size "
            f"to a multiple of {factor} (volumes are made at the training box)"
        )
    dm = VolumeDataModule(
        str(paths["volumes"]), batch_size=int(a.batch_size), val_fraction=float(a.val_fraction),
        split_seed=int(a.split_seed), mask=a.get("mask"), num_workers=int(a.get("num_workers", 0)),
        indices=np.flatnonzero(kept),
    )
    if ctx.cfg.get("seed") is not None:
        L.seed_everything(int(ctx.cfg.seed), workers=True)
    model = hydra.utils.instantiate(ctx.cfg.model, **dm.info())
    trainer = ctx.trainer("autoencoder", int(a.epochs), monitor="val/loss")
    trainer.fit(model, datamodule=dm)
    summary = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        best = best_checkpoint(trainer)
        if best:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            model.load_state_dict(state)
            summary["checkpoint"] = best
        accel = str(ctx.cfg.trainer.get("accelerator", "auto"))
        device = "cuda" if torch.cuda.is_available() and accel in ("gpu", "cuda", "auto") else "cpu"
        features = extract_features(model, dm.predict_dataloader(), device, n_volumes=len(kept))
        features[~kept] = 0.0
        write_npy(paths["features"], features)
        summary.update(n_volumes=int(kept.sum()), feature_size=int(features.shape[1]))
    trainer.strategy.barrier("alphacryo4d-autoencoder")
    return summary, [paths["features"]]


# ----------------------------------------------------------------------------- 4. manifold
def manifold(ctx):
    """2-D embedding of the kept volumes (raw t-SNE units; NaN rows for dropped volumes)."""
    from hetero.models.alphacryo4d.manifold import tsne, umap, volume_distances

    m = ctx.mcfg.manifold
    paths = stage_paths(ctx.root)
    kept = load_members(ctx.root)["kept"]
    idx = np.flatnonzero(kept)
    volumes = np.load(paths["volumes"], mmap_mode="r") if m.use_volumes else None
    features = np.load(paths["features"])[idx] if m.use_features else None
    mask = None
    if m.get("mask"):
        from hetero.data.io.mrc import read_volume

        mask = np.asarray(read_volume(m.mask)[0], np.float32)
    d2 = volume_distances(volumes, features, float(m.volume_weight), float(m.feature_weight),
                          bool(m.standardize_features), mask, volume_indices=idx)
    if m.method == "tsne":
        t = m.tsne
        xy = tsne(d2, t.perplexity, t.max_iter, t.learning_rate, t.early_exaggeration, t.init, t.method,
                  t.angle, t.seed)
    elif m.method == "umap":
        xy = umap(d2, m.umap.n_neighbors, m.umap.min_dist, m.umap.seed)
    else:
        raise ValueError(f"alphacryo4d.manifold.method must be tsne or umap, got {m.method!r}")
    embedding = np.full((len(kept), 2), np.nan)
    embedding[idx] = xy
    write_npy(paths["embedding"], embedding)
    return {"method": str(m.method), "n_volumes": int(len(idx)),
            "extent": np.ptp(xy, axis=0).round(2).tolist()}, [paths["embedding"]]


# ----------------------------------------------------------------------------- 5. landscape
def check_landscape_options(c) -> str:
    """``alphacryo4d.landscape.energy`` (``counts`` or ``density``), checked with ``bandwidth``
    (density only). Called before any stage runs (:func:`hetero.tasks.alphacryo4d.run_pipeline`).

    :raises ConfigError: an unknown energy, or a bandwidth that would not act.
    """
    from hetero.utils.errors import ConfigError

    mode = str(c.get("energy", "counts"))
    if mode not in ("counts", "density"):
        raise ConfigError(f"alphacryo4d.landscape.energy must be counts or density, got {mode!r}")
    bandwidth = c.get("bandwidth")
    if bandwidth is not None and mode != "density":
        raise ConfigError(f"alphacryo4d.landscape.bandwidth={bandwidth} applies to landscape.energy=density only "
                          f"(energy={mode}): set alphacryo4d.landscape.energy=density or "
                          "alphacryo4d.landscape.bandwidth=null")
    if bandwidth is not None and not float(bandwidth) > 0:
        raise ConfigError(f"alphacryo4d.landscape.bandwidth={bandwidth} must be > 0 (embedding units) or null")
    return mode


def landscape(ctx):
    """Pseudo-energy of the kept volumes over the embedding (``landscape.energy``: ``counts``,
    the paper's per-volume ``-ln(n_v / sum n)`` interpolated; or ``density``, of the
    count-weighted volume density); its minima. Saves the interpolation nodes as ``points``."""
    from hetero.analysis.landscape import (
        Landscape,
        find_minima,
        pseudo_energy,
        volume_density_landscape,
    )

    c = ctx.mcfg.landscape
    paths = stage_paths(ctx.root)
    members = load_members(ctx.root)
    kept = members["kept"]
    xy = np.load(paths["embedding"])[kept]
    counts = members["counts"][kept]
    mode, extra = check_landscape_options(c), {}
    if mode == "counts":
        land = Landscape.from_points(xy, pseudo_energy(counts), str(c.interpolation))
    else:
        land, bandwidth = volume_density_landscape(xy, counts, c.get("bandwidth"), method=str(c.interpolation))
        extra["bandwidth"] = round(bandwidth, 4)
    minima, minima_energy = find_minima(land, c.get("min_separation"), c.get("max_minima"), int(c.grid_size))
    xs, ys, grid = land.grid(int(c.grid_size))
    from hetero.utils.files import atomic_write

    atomic_write(paths["landscape"], lambda p: np.savez(
        p, points=land.points, energies=land.energies, volume_ids=np.flatnonzero(kept), minima=minima,
        minima_energy=minima_energy, grid_x=xs, grid_y=ys, grid=grid))
    log.info(f"landscape ({mode}) of {len(xy)} volumes: {len(minima)} minima, deepest G = {minima_energy.min():.2f}")
    return {"energy": mode, **extra, "n_points": int(len(xy)), "n_minima": int(len(minima)),
            "minima": minima.round(3).tolist(), "minima_energy": minima_energy.round(4).tolist()}, [paths["landscape"]]


def _landscape(ctx):
    from hetero.analysis.landscape import Landscape

    with np.load(stage_paths(ctx.root)["landscape"]) as f:
        return Landscape.from_points(f["points"], f["energies"], str(ctx.mcfg.landscape.interpolation)), dict(f)


# ----------------------------------------------------------------------------- 6. path
def path(ctx):
    """Minimum-energy path between two minima (given or the two deepest) and the states."""
    from hetero.analysis.string_method import graph_path, path_states, string_method

    p = ctx.mcfg.path
    paths = stage_paths(ctx.root)
    land, saved = _landscape(ctx)
    minima = saved["minima"]
    mode = str(p.states)
    k = int(p.k)
    summary: dict = {"states": mode}
    start, end = p.get("start"), p.get("end")
    have_ends = (start is not None and end is not None) or len(minima) >= 2
    if mode == "path" and not have_ends:
        raise ValueError("the landscape has fewer than two minima: give alphacryo4d.path.start and alphacryo4d.path.end")
    if have_ends:  # the path is also drawn when the states are the minima
        start = minima[0] if start is None else start
        end = minima[1] if end is None else end
        if p.init not in ("graph", "straight"):
            raise ValueError(f"alphacryo4d.path.init must be graph or straight, got {p.init!r}")
        initial = graph_path(land, start, end) if p.init == "graph" else None
        res = string_method(land, start, end, int(p.n_images), float(p.step), float(p.tol), int(p.max_steps),
                            str(p.gradient), float(p.fd_step), bool(p.fix_endpoints), initial,
                            p.get("stationary_window"))
        if res.stationary:
            log.info(f"string method: stationary after {res.n_steps} steps (the images hop in place by "
                     f"{res.final_change:.2e} per step, net {res.window_drift:.2e} over the last "
                     f"{p.stationary_window} steps; tol {p.tol} is out of reach, e.g. on a linear "
                     "interpolant); using this string")
        elif not res.converged:
            log.warning(f"string method: not converged after {res.n_steps} steps (change {res.final_change:.2e} > "
                        f"tol {p.tol}); using the last string")
        if res.hull_corrections:
            log.info(f"string method: {res.hull_corrections} image positions moved back inside the convex hull")
        write_npy(paths["path"], res.path)
        summary.update(start=np.asarray(start, float).round(3).tolist(), end=np.asarray(end, float).round(3).tolist(),
                       n_steps=res.n_steps, converged=res.converged, stationary=res.stationary,
                       hull_corrections=res.hull_corrections,
                       length=round(res.length, 3), max_energy=float(np.nanmax(res.energies)))
    elif paths["path"].exists():
        paths["path"].unlink()
    if mode == "path":
        states = path_states(np.load(paths["path"]), k)
    elif mode == "minima":
        states = minima[:k]
    else:
        raise ValueError(f"alphacryo4d.path.states must be path or minima, got {mode!r}")
    write_npy(paths["states"], states)
    summary.update(n_states=int(len(states)), state_centers=states.round(3).tolist())
    outputs = [paths["states"]] + ([paths["path"]] if have_ends else [])
    return summary, outputs


# ----------------------------------------------------------------------------- 7. voting
def voting(ctx):
    """Volumes to the states within the radius, majority voting, one RELION subset per state
    (all original columns) and the discarded particles."""
    from hetero.analysis.subsets import write_subset
    from hetero.analysis.voting import (
        Memberships,
        assign_to_centers,
        default_radius,
        majority_vote,
        nearest_vote,
    )

    v = ctx.mcfg.voting
    paths = stage_paths(ctx.root)
    members = load_members(ctx.root)
    kept = members["kept"]
    states = np.load(paths["states"])
    radius = float(v.radius) if v.get("radius") is not None else default_radius(states)
    xy = np.load(paths["embedding"])
    volume_labels = np.full(len(kept), -1, dtype=np.int64)
    labels_kept, distance = assign_to_centers(xy[kept], states, radius)
    volume_labels[kept] = labels_kept
    dist = np.full(len(kept), np.nan)
    dist[kept] = distance
    mem = Memberships(members["indptr"], members["indices"], int(members["n_particles"]))
    mode = str(v.get("mode", "majority"))
    if mode == "majority":
        result = majority_vote(mem, volume_labels, len(states), v.get("threshold"))
    elif mode == "nearest":
        points = np.where(kept[:, None], xy, np.nan)
        result = nearest_vote(mem, points, states, radius)
    else:
        raise ValueError(f"alphacryo4d.voting.mode must be majority or nearest, got {mode!r}")
    write_npy(paths["volume_labels"], volume_labels)
    write_npy(paths["volume_distance"], dist)
    write_npy(paths["labels"], result.labels)
    write_npy(paths["winning_votes"], result.winning_votes)
    table = ctx.datamodule().table
    folder = paths["subsets"]
    written = []
    width = max(3, len(str(len(states) - 1)))
    for k in range(len(states)):
        written += list(write_subset(folder, f"state_{k:0{width}d}", table, result.state(k)).values())
    written += list(write_subset(folder, "discarded", table, np.flatnonzero(result.labels < 0)).values())
    summary = {
        "mode": mode, "radius": radius, "threshold": result.threshold, "votes_per_particle": int(result.memberships.max()),
        "state_sizes": result.counts.tolist(), "volumes_per_state": np.bincount(labels_kept[labels_kept >= 0],
                                                                             minlength=len(states)).tolist(),
        "n_discarded": result.n_discarded, "discard_rate": result.n_discarded / len(result.labels),
    }
    write_json(paths["voting_summary"], summary)
    log.info(f"voting (threshold {result.threshold} of {summary['votes_per_particle']}): states "
             f"{result.counts.tolist()}, {result.n_discarded} discarded ({100 * summary['discard_rate']:.1f} %)")
    return summary, [paths["labels"], paths["volume_labels"], paths["voting_summary"], *written]
