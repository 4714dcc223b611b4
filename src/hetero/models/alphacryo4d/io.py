"""Files of an AlphaCryo4D run (``<run_dir>/alphacryo4d/``), shared by the pipeline task and
the result loader.

The volume manifest ``resampling/members.npz`` fixes the row order of every per-volume array
after it: volume ``v`` was reconstructed from union ``union[v]``, class ``klass[v]``, and holds
particles ``indices[indptr[v]:indptr[v+1]]`` (0-based rows of the consensus particle table);
``kept[v]`` says whether it has at least ``model.resampling.min_particles`` particles and
enters the autoencoder, the manifold and the landscape.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hetero.utils.files import atomic_write, write_json

ROOT = "alphacryo4d"


def stage_paths(root: str | Path) -> dict[str, Path]:
    """Every file the stages write, by name (``root`` = ``<run_dir>/alphacryo4d``)."""
    root = Path(root)
    return {
        "unions": root / "shuffling" / "unions.npz",
        "shuffle": root / "shuffling" / "shuffle.npz",
        "volumes": root / "resampling" / "volumes.npy",
        "members": root / "resampling" / "members.npz",
        "volumes_info": root / "resampling" / "volumes.json",
        "volumes_csv": root / "resampling" / "volumes.csv",
        "features": root / "autoencoder" / "features.npy",
        "embedding": root / "manifold" / "embedding.npy",
        "landscape": root / "landscape" / "landscape.npz",
        "path": root / "path" / "path.npy",
        "states": root / "path" / "states.npy",
        "volume_labels": root / "voting" / "volume_labels.npy",
        "volume_distance": root / "voting" / "volume_distance.npy",
        "labels": root / "voting" / "labels.npy",
        "winning_votes": root / "voting" / "winning_votes.npy",
        "voting_summary": root / "voting" / "summary.json",
        "subsets": root / "voting" / "subsets",
    }


def write_members(
    root: str | Path,
    lists: list[np.ndarray],
    union: np.ndarray,
    klass: np.ndarray,
    n_particles: int,
    min_particles: int,
    names: list[str],
) -> dict:
    """Write the volume manifest (``members.npz`` + a readable ``volumes.csv``)."""
    paths = stage_paths(root)
    counts = np.array([len(a) for a in lists], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = np.concatenate(lists).astype(np.int64) if lists else np.zeros(0, np.int64)
    kept = counts >= max(1, int(min_particles))
    atomic_write(paths["members"], lambda p: np.savez(
        p, indptr=indptr, indices=indices, union=np.asarray(union, np.int64), klass=np.asarray(klass, np.int64),
        counts=counts, kept=kept, n_particles=np.int64(n_particles)))
    rows = ["volume,name,union,class,particles,kept"]
    rows += [f"{v},{names[v]},{int(union[v])},{int(klass[v])},{int(counts[v])},{int(kept[v])}" for v in range(len(counts))]
    atomic_write(paths["volumes_csv"], lambda p: p.write_text("\n".join(rows) + "\n"))
    return {"n_volumes": int(len(counts)), "n_kept": int(kept.sum()), "counts_min": int(counts.min()) if len(counts) else 0,
            "counts_max": int(counts.max(initial=0)), "counts_mean": float(counts.mean()) if len(counts) else 0.0}


def load_members(root: str | Path) -> dict[str, np.ndarray]:
    """The volume manifest as a dict of arrays (see the module docstring)."""
    return read_members(stage_paths(root)["members"])


def read_members(path: str | Path) -> dict[str, np.ndarray]:
    """``members.npz`` at ``path`` as a dict of arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no volume manifest; run the resampling stage first")
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def write_volumes_info(root: str | Path, info: dict) -> None:
    write_json(stage_paths(root)["volumes_info"], info)


def load_volumes_info(root: str | Path) -> dict:
    """``{"box_size", "voxel_size", "source", ...}`` of the resampled volumes."""
    return json.loads(stage_paths(root)["volumes_info"].read_text())
