"""Reading the ground truth of a synthetic dataset (:mod:`hetero.data.synthetic.simulate`).

Example usage::

    truth = load_truth(ds.truth_dir)        # labels (N,), volumes (K, D, D, D), apix, ...
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["load_truth"]


def load_truth(truth_dir: str | Path) -> dict:
    """Ground truth of a synthetic dataset, for analysis code.

    :param truth_dir: the dataset folder (or any file inside it, e.g. the ``.star``).
    :return: dict with ``kind``, ``labels`` ``(N,)`` int64, ``t`` ``(N,)`` (continuous; else
        ``None``), ``t_grid`` ``(K,)`` (continuous; else ``None``), ``volumes`` ``(K, D, D, D)``
        float32 numpy, ``apix``, ``box_size``, ``snr_box``, ``snr_masked``, ``states``,
        ``counts``, ``summary`` (``truth.json``) and every array of ``truth.npz``.
    """
    from hetero.data.io.mrc import read_volume

    folder = Path(truth_dir)
    if folder.is_file():
        folder = folder.parent
    summary = json.loads((folder / "truth.json").read_text())
    with np.load(folder / "truth.npz") as npz:
        out = {key: npz[key] for key in npz.files}
    volumes = [read_volume(folder / s["volume"])[0] for s in summary["states"]]
    out.update(
        kind=summary["kind"],
        t=out.get("t"),
        t_grid=out.get("t_grid"),
        volumes=np.stack(volumes).astype(np.float32),
        apix=float(summary["pixel_size_angstrom"]),
        box_size=int(summary["box_size"]),
        snr_box=summary["snr_box"],
        snr_masked=summary["snr_masked"],
        states=summary["states"],
        counts=summary["counts"],
        summary=summary,
    )
    return out
