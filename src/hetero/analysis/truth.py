"""Ground truth for scoring an analysis: user files (``+truth.*``) or a synthetic dataset's truth.

Example usage::

    truth = load_ground_truth(cfg.truth, truth_dir=None, n_particles=n, box=128, apix=1.5)
    truth["labels"], truth["volumes"]        # (N,) int, (K, D, D, D) torch on the original grid
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hetero.analysis.volumes import resample_to_box
from hetero.data.io.mrc import read_volume


def _on_original_grid(
    volumes: np.ndarray, apix: float, box: int, original_apix: float
) -> torch.Tensor:
    return resample_to_box(
        torch.from_numpy(np.array(volumes, dtype=np.float32)), apix, box, original_apix
    )


def _user_truth(user, box: int, apix: float) -> dict[str, Any]:
    truth: dict[str, Any] = {"source": "user (+truth)"}
    if user.get("labels"):
        truth["labels"] = np.load(str(user.labels)).astype(np.int64).ravel()
    if user.get("t"):
        truth["t"] = np.load(str(user.t)).astype(np.float64)
    if user.get("volumes"):
        vols = []
        for p in user.volumes:
            vol, vapix = read_volume(str(p))
            vols.append(_on_original_grid(vol[None], vapix, box, apix)[0])
        truth["volumes"] = torch.stack(vols)
    truth["kind"] = user.get("kind") or (
        "continuous" if "t" in truth and "labels" not in truth else "discrete"
    )
    return truth


def _synthetic_truth(truth_dir, box: int, apix: float) -> dict[str, Any]:
    from hetero.data.synthetic import load_truth

    raw = load_truth(truth_dir)
    truth: dict[str, Any] = {
        "source": f"synthetic ({truth_dir})",
        "kind": str(raw.get("kind", "discrete")),
    }
    for key in ("labels", "t", "t_grid"):
        if raw.get(key) is not None:
            truth[key] = np.asarray(raw[key])
    if raw.get("volumes") is not None:
        truth["volumes"] = _on_original_grid(
            np.asarray(raw["volumes"]), float(raw.get("apix", apix)), box, apix
        )
    return truth


def load_ground_truth(
    user, truth_dir, n_particles: int, box: int, apix: float, dataset=None
) -> dict | None:
    """Ground truth from ``user`` (the ``truth`` config: ``labels``, ``t``, ``volumes``, ``kind``)
    or else from a synthetic dataset's ``truth_dir``.

    :param dataset: the synthetic dataset object (kept under ``"dataset"`` for the oracle).
    :return: ``None`` or a dict with any of ``labels`` (N,), ``t`` (N,) or (N, P), ``volumes``
        (K, D, D, D) torch on the original grid, ``kind``, ``source``, ``labels_from_t``.
    :raises ValueError: lengths or label ranges that do not fit the run.
    """
    if user:
        truth = _user_truth(user, box, apix)
    elif truth_dir:
        truth = _synthetic_truth(truth_dir, box, apix)
        if dataset is not None:
            truth["dataset"] = dataset
    else:
        return None
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
