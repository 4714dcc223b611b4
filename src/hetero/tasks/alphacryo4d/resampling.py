"""Stage 2 of AlphaCryo4D: resampled volumes and the particles behind each.

``alphacryo4d.resampling.source``:

- ``class3d`` (default): ``model=class3d``'s replicate mode classifies every union of
  ``shuffling/unions.npz`` into ``K`` classes in one pass over the data per EM iteration
  (poses fixed, as RELION's ``--skip_align`` in the reference). Volume ``u * K + c`` is class
  ``c`` of union ``u``; its particles are those whose most probable class in union ``u`` is
  ``c``. The volumes share the consensus frame, so no alignment is needed.
- ``files``: volumes made elsewhere (one MRC map and one RELION particle STAR file per volume);
  particles are matched to the consensus by their exact identity (image index and stack
  file, resolved as the STAR readers resolve ``rlnImageName``). With
  ``files.align`` each map is first rigidly aligned to ``files.reference`` (default: the map with
  the most particles), as the reference's EMAN2 ``fit.sh`` did
  (:func:`hetero.models.alphacryo4d.alignment.align_volume`; rotations, shifts and scores in
  ``resampling/alignment.npz``).

Writes ``volumes.npy`` ``(V, D, D, D)`` float32 (memory-mapped by later stages),
``members.npz`` / ``volumes.csv`` (:func:`hetero.models.alphacryo4d.io.write_members`) and
``volumes.json`` (box, voxel size).
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np

from hetero.models.alphacryo4d.io import stage_paths, write_members, write_volumes_info
from hetero.utils.files import write_npy
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)


def resampling(ctx):
    source = str(ctx.mcfg.resampling.source)
    if source == "class3d":
        return _class3d(ctx)
    if source == "files":
        return _from_files(ctx)
    raise ValueError(f"alphacryo4d.resampling.source must be class3d or files, got {source!r}")


def _outputs(ctx) -> list[Path]:
    p = stage_paths(ctx.root)
    return [p["volumes"], p["members"], p["volumes_info"], p["volumes_csv"]]


def _union_names(ctx, n_unions: int) -> list[str]:
    with np.load(stage_paths(ctx.root)["shuffle"]) as f:
        batch = f["union_batch"]
    per_batch = n_unions // (int(batch.max()) + 1)
    return [f"u{u % per_batch + 1}_b{int(batch[u]) + 1}" for u in range(n_unions)]


def predict_replicate_classes(model, loader, device, n_particles: int, n_replicates: int) -> np.ndarray:
    """``(N, U)`` most probable class of every particle in every replicate (-1: not in it)."""
    import torch

    model = model.to(device).eval()
    out = np.full((n_particles, n_replicates), -1, dtype=np.int64)
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            pred = model.predict_step(batch)
            cls = pred["replicate_class"] if "replicate_class" in pred else pred["class_number"][:, None]
            out[batch["index"].cpu().numpy()] = cls.cpu().numpy()
    return out


def _class3d(ctx):
    import hydra
    import torch

    r = ctx.mcfg.resampling
    paths = stage_paths(ctx.root)
    clf = r.classifier
    dm = ctx.datamodule(sampler=r.get("sampler"))
    info = dm.info()
    with np.load(paths["unions"]) as f:
        n_unions = len(f.files)
    model = hydra.utils.instantiate(clf, subsets=str(paths["unions"]), n_replicates=1, **info)
    k = int(clf.n_classes)
    trainer = ctx.trainer("resampling", int(clf.n_iterations), monitor=None)
    trainer.fit(model, datamodule=dm)
    summary: dict = {"n_unions": n_unions, "n_classes": k, "iterations": int(clf.n_iterations)}
    if trainer.is_global_zero:
        accel = str(ctx.cfg.trainer.get("accelerator", "auto"))
        device = "cuda" if torch.cuda.is_available() and accel in ("gpu", "cuda", "auto") else "cpu"
        classes = predict_replicate_classes(model, dm.predict_dataloader(shard=False), device,
                                            info["n_particles"], n_unions)
        maps = model.replicate_maps().float().cpu().numpy()
        if maps.shape[0] != n_unions * k:
            raise RuntimeError(f"class3d returned {maps.shape[0]} maps for {n_unions} unions x {k} classes")
        write_npy(paths["volumes"], maps.astype(np.float32))
        lists = [np.flatnonzero(classes[:, u] == c) for u in range(n_unions) for c in range(k)]
        unions = np.repeat(np.arange(n_unions), k)
        klass = np.tile(np.arange(k), n_unions)
        names = [f"{n}_c{c + 1}" for n in _union_names(ctx, n_unions) for c in range(k)]
        summary.update(write_members(ctx.root, lists, unions, klass, info["n_particles"],
                                     int(r.min_particles), names))
        write_volumes_info(ctx.root, {"source": "class3d", "box_size": int(maps.shape[-1]),
                                      "voxel_size": float(model.template_voxel_size()),
                                      "n_unions": n_unions, "n_classes": k})
        log.info(f"{len(lists)} volumes ({summary['n_kept']} with >= {r.min_particles} particles), "
                 f"{summary['counts_min']}-{summary['counts_max']} particles each")
    trainer.strategy.barrier("alphacryo4d-resampling")
    return summary, _outputs(ctx)


def _expand(spec) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, str):
        found = sorted(glob.glob(spec))
        if not found:
            raise FileNotFoundError(f"no file matches {spec!r}")
        return found
    return [str(s) for s in spec]


def _align_stack(ctx, stack, lists, f) -> None:
    """Align every map of ``stack`` (in place) to the reference map."""
    from hetero.data.io.mrc import read_volume
    from hetero.models.alphacryo4d.alignment import align_volume
    from hetero.utils.files import atomic_write

    if f.get("reference"):
        reference, _ = read_volume(f.reference)
        reference = np.asarray(reference, np.float32)
        if reference.shape != stack.shape[1:]:
            raise ValueError(f"{f.reference}: shape {reference.shape}, the maps are {stack.shape[1:]}")
    else:
        reference = np.array(stack[int(np.argmax([len(a) for a in lists]))])
    rotations, shifts, scores = [], [], []
    for v in range(len(stack)):
        aligned, info = align_volume(stack[v], reference, seed=v)
        stack[v] = aligned
        rotations.append(info["rotation"])
        shifts.append(info["shift"])
        scores.append(info["score"])
    log.info(f"aligned {len(stack)} maps: correlation with the reference {np.min(scores):.3f}-{np.max(scores):.3f}")
    path = stage_paths(ctx.root)["volumes"].with_name("alignment.npz")
    atomic_write(path, lambda p: np.savez(p, rotation=np.stack(rotations), shift=np.stack(shifts),
                                          score=np.asarray(scores)))


def _from_files(ctx):
    """Volumes and per-volume particle lists made elsewhere (a common frame is assumed)."""
    from hetero.analysis.voting import star_file_keys, table_keys
    from hetero.data.io.errors import InputError
    from hetero.data.io.mrc import read_volume

    f = ctx.mcfg.resampling.files
    maps, stars = _expand(f.maps), _expand(f.stars)
    if not maps or len(maps) != len(stars):
        raise InputError(
            f"alphacryo4d.resampling.files: need one STAR particle list per map, got {len(maps)} maps and "
            f"{len(stars)} star files (glob patterns are sorted)"
        )
    dm = ctx.datamodule()
    consensus = table_keys(dm.table)
    lookup = {key: i for i, key in enumerate(consensus)}
    lists = []
    for star in stars:
        keys = star_file_keys(star)
        missing = [k for k in keys if k not in lookup]
        if missing:
            raise InputError(f"{star}: {len(missing)} particles are not in the consensus "
                             f"{dm.particles_path}, first {missing[0]!r}")
        lists.append(np.array([lookup[k] for k in keys], dtype=np.int64))
    first, apix = read_volume(maps[0])
    info = dm.info()
    extent, particles_extent = first.shape[-1] * apix, info["original_box"] * info["original_apix"]
    if abs(extent - particles_extent) > 0.02 * particles_extent:
        raise InputError(
            f"{maps[0]}: the map spans {first.shape[-1]} x {apix:.4g} Å = {extent:.4g} Å but the particle "
            f"box {info['original_box']} x {info['original_apix']:.4g} Å = {particles_extent:.4g} Å; the "
            "maps must be on the particles' box extent (any sampling): resample or pad them first")
    target = stage_paths(ctx.root)["volumes"]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.partial.npy")
    stack = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(maps), *first.shape))
    for v, path in enumerate(maps):
        vol, vapix = read_volume(path)
        if vol.shape != first.shape or abs(vapix - apix) > 1e-3 * apix:
            raise InputError(f"{path}: {vol.shape} at {vapix:.4f} Å/px, but {maps[0]} is {first.shape} "
                             f"at {apix:.4f} Å/px; resample the maps to one grid first")
        stack[v] = vol
    if f.get("align"):
        _align_stack(ctx, stack, lists, f)
    stack.flush()
    del stack
    tmp.replace(target)
    names = [Path(m).stem for m in maps]
    summary = write_members(ctx.root, lists, np.arange(len(maps)), np.zeros(len(maps), np.int64),
                            len(consensus), int(ctx.mcfg.resampling.min_particles), names)
    write_volumes_info(ctx.root, {"source": "files", "box_size": int(first.shape[-1]), "voxel_size": float(apix)})
    return summary, _outputs(ctx)
