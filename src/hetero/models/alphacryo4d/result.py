"""The AlphaCryo4D run manifest and result loader (analysis contract, ANALYSIS_CONTRACT.md).

``python analyze.py run_dir=<AlphaCryo4D run>`` reads ``manifest.json``, which names
:func:`load_alphacryo4d_result`; it fills :class:`hetero.analysis.result.AnalysisResult` from
the stage outputs under ``<run_dir>/alphacryo4d/`` (see :mod:`hetero.models.alphacryo4d.io`):

- ``labels``: the voted state of every particle (-1 = discarded), ``label_name`` "voted state";
- ``embedding``: per particle, the mean landscape position of the volumes it is in (the
  particle's ``M`` votes), ``(N, 2)``;
- ``volume_embedding`` / ``volume_counts``: the resampled volumes' points and particle counts;
- ``state_maps``: per state, the particle-weighted mean of the volumes clustered to it (the
  reconstruction step rebuilds each state from its voted particles with half maps and FSC);
- ``decode``: ``None`` (no decoder; maps come from the particles).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hetero.models.alphacryo4d.io import ROOT, load_members, load_volumes_info, stage_paths

LOADER = "hetero.models.alphacryo4d.result.load_alphacryo4d_result"


def run_manifest_dict() -> dict:
    """The run manifest of an AlphaCryo4D run (paths relative to the run directory)."""
    paths = stage_paths(ROOT)
    parts = {
        "unions": {"kind": "npz", "path": str(paths["unions"])},
        "volumes": {"kind": "volumes", "path": str(paths["volumes"])},
        "members": {"kind": "npz", "path": str(paths["members"])},
        "autoencoder": {"kind": "checkpoint", "path": f"{ROOT}/autoencoder/checkpoints/best.ckpt"},
        "features": {"kind": "npy", "path": str(paths["features"])},
        "embedding": {"kind": "npy", "path": str(paths["embedding"])},
        "landscape": {"kind": "npz", "path": str(paths["landscape"])},
        "states": {"kind": "npy", "path": str(paths["states"])},
        "voting": {"kind": "npy", "path": str(paths["labels"])},
    }
    return {"format": 1, "method": "alphacryo4d", "result_loader": LOADER, "parts": parts, "analysis_steps": []}


def particle_landscape_positions(embedding: np.ndarray, members: dict) -> np.ndarray:
    """``(N, 2)`` mean position of the kept volumes holding each particle (NaN: none)."""
    n = int(members["n_particles"])
    counts = np.diff(members["indptr"])
    vol = np.repeat(np.arange(len(counts)), counts)
    ok = members["kept"][vol]
    sums = np.zeros((n, 2))
    np.add.at(sums, members["indices"][ok], embedding[vol[ok]])
    hits = np.bincount(members["indices"][ok], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / hits[:, None]


def state_mean_maps(volumes, volume_labels: np.ndarray, counts: np.ndarray, n_states: int) -> np.ndarray:
    """``(S, D, D, D)`` particle-weighted mean of the volumes of each state (zeros if none)."""
    d = volumes.shape[-1]
    out = np.zeros((n_states, d, d, d), np.float32)
    for k in range(n_states):
        vols = np.flatnonzero(volume_labels == k)
        if len(vols):
            w = counts[vols].astype(np.float64)
            acc = np.zeros((d, d, d))
            for v, wv in zip(vols, w):
                acc += wv * np.asarray(volumes[v], np.float64)
            out[k] = acc / w.sum()
    return out


def load_alphacryo4d_result(run, cfg):
    """``loader(run, cfg) -> AnalysisResult`` for an AlphaCryo4D run directory."""
    import torch

    from hetero.analysis.result import AnalysisResult

    root = Path(run.path) / ROOT
    paths = stage_paths(root)
    for name in ("members", "embedding", "states", "labels", "volume_labels"):
        if not paths[name].is_file():
            raise FileNotFoundError(f"{paths[name]}: the AlphaCryo4D run is incomplete; rerun "
                                    f"python train.py model=alphacryo4d hydra.run.dir={run.path}")
    members = load_members(root)
    embedding = np.load(paths["embedding"])
    labels = np.load(paths["labels"]).astype(np.int64)
    volume_labels = np.load(paths["volume_labels"])
    states = np.load(paths["states"])
    volumes = np.load(paths["volumes"], mmap_mode="r")
    info = load_volumes_info(root)
    maps = state_mean_maps(volumes, volume_labels, members["counts"], len(states))
    per_particle = {"winning_votes": np.load(paths["winning_votes"])} if paths["winning_votes"].is_file() else {}
    kept = members["kept"]
    return AnalysisResult(
        method="alphacryo4d",
        n_particles=int(members["n_particles"]),
        embedding=np.nan_to_num(particle_landscape_positions(embedding, members)).astype(np.float32),
        embedding_name="landscape position",
        labels=labels,
        label_name="voted state",
        decode=None,
        voxel_size=float(info["voxel_size"]),
        state_maps=torch.from_numpy(maps),
        volume_embedding=embedding[kept].astype(np.float32),
        volume_counts=members["counts"][kept],
        per_particle=per_particle,
        provenance={"run": str(run.path), "manifest_parts": sorted(run_manifest_dict()["parts"])},
        extras={"states": states, "volume_labels": volume_labels[kept],
                "path": np.load(paths["path"]) if paths["path"].is_file() else None,
                "landscape": paths["landscape"]},
    )
