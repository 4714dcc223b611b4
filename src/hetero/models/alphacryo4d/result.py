"""The AlphaCryo4D run manifest and result loader (docs/design/analysis_interface.md).

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

import json

import numpy as np

from hetero.models.alphacryo4d.io import ROOT, read_members, stage_paths
from hetero.utils.manifest import run_manifest

LOADER = "hetero.models.alphacryo4d.result.load_alphacryo4d_result"


#: method steps run by ``analyze.py`` after the shared ones
ANALYSIS_STEPS = ("hetero.models.alphacryo4d.steps.volume_landscape",)


def run_manifest_dict() -> dict:
    """The run manifest of an AlphaCryo4D run (paths relative to the run directory), as
    :func:`hetero.utils.manifest.run_manifest` completes it. ``model`` is the autoencoder's
    checkpoint (what ``RunDir.open(checkpoint=best)`` finds); the loader reads the others."""
    paths = stage_paths(ROOT)
    parts = {
        "model": {"kind": "checkpoint", "path": f"{ROOT}/autoencoder/checkpoints/best.ckpt",
                  "config": "config_resolved.yaml"},
        "unions": {"kind": "npz", "path": str(paths["unions"])},
        "volumes": {"kind": "volumes", "path": str(paths["volumes"])},
        "members": {"kind": "npz", "path": str(paths["members"])},
        "volumes_info": {"kind": "json", "path": str(paths["volumes_info"])},
        "features": {"kind": "npy", "path": str(paths["features"])},
        "embedding": {"kind": "npy", "path": str(paths["embedding"])},
        "landscape": {"kind": "npz", "path": str(paths["landscape"])},
        "path": {"kind": "npy", "path": str(paths["path"])},
        "states": {"kind": "npy", "path": str(paths["states"])},
        "volume_labels": {"kind": "npy", "path": str(paths["volume_labels"])},
        "voting": {"kind": "npy", "path": str(paths["labels"])},
        "winning_votes": {"kind": "npy", "path": str(paths["winning_votes"])},
        "voting_summary": {"kind": "json", "path": str(paths["voting_summary"])},
        "subsets": {"kind": "star_folder", "path": str(paths["subsets"])},
    }
    return run_manifest({"method": "alphacryo4d", "result_loader": LOADER, "parts": parts,
                         "analysis_steps": list(ANALYSIS_STEPS)})


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

    need = ("members", "volumes", "volumes_info", "embedding", "states", "volume_labels", "voting")
    part = {name: run.part_path(name) for name in (*need, "path", "winning_votes")}
    for name in need:
        if part[name] is None or not part[name].is_file():
            raise FileNotFoundError(
                f"{part[name] or name}: the AlphaCryo4D run {run.path} is incomplete (manifest part "
                f"{name!r}); finish it with python train.py model=alphacryo4d hydra.run.dir={run.path}")
    members = read_members(part["members"])
    embedding = np.load(part["embedding"])
    labels = np.load(part["voting"]).astype(np.int64)
    volume_labels = np.load(part["volume_labels"])
    states = np.load(part["states"])
    volumes = np.load(part["volumes"], mmap_mode="r")
    info = json.loads(part["volumes_info"].read_text())
    maps = state_mean_maps(volumes, volume_labels, members["counts"], len(states))
    winning = part["winning_votes"]
    per_particle = {"winning_votes": np.load(winning)} if winning is not None and winning.is_file() else {}
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
        provenance={"run": str(run.path), "checkpoint": str(run.checkpoint),
                    "manifest_parts": sorted(run.manifest.get("parts", {}))},
        extras={"states": states, "volume_labels": volume_labels[kept],
                "path": np.load(part["path"]) if part["path"] is not None and part["path"].is_file() else None,
                "landscape": run.part_path("landscape")},
    )
