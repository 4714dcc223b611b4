"""Particle subsets for downstream refinement: RELION ``.star`` plus index files.

Each subset is written as ``<name>.star`` (the *original* particle rows and optics table when
the input was a star file, via :func:`hetero.data.io.star.write_star`), ``<name>.npy``
(0-based int64 row indices in input order, for cryoSPARC/cryoDRGN-style filtering) and
``<name>.txt`` (the same indices, one per line).

Example usage::

    files = write_subset(out / "subsets", "cluster_003", table, np.flatnonzero(labels == 3))
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from hetero.data.io.star import write_star
from hetero.utils.files import write_npy, write_text


def write_subset(
    folder: str | Path, name: str, table, indices: np.ndarray, columns: dict[str, np.ndarray] | None = None
) -> dict[str, Path]:
    """Write one subset; returns ``{"star", "npy", "txt"}`` paths. ``columns``: particle columns
    over all ``N`` particles to add or replace in the star file (e.g. ``rlnClassNumber``).

    :raises ValueError: indices out of range. Errors of the star writer propagate (a subset
        without its ``.star`` is never reported as written).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    idx = np.asarray(indices, dtype=np.int64).ravel()
    if idx.size and (idx.min() < 0 or idx.max() >= len(table)):
        raise ValueError(f"subset {name}: indices out of range for {len(table)} particles")
    files = {
        "npy": write_npy(folder / f"{name}.npy", idx),
        "txt": write_text(folder / f"{name}.txt", "".join(f"{i}\n" for i in idx)),
    }
    star = folder / f"{name}.star"
    write_star(star, table, indices=idx, columns=columns)
    files["star"] = star
    return files


def cluster_subsets(
    labels: np.ndarray,
    clusters: Sequence[int | Sequence[int]] | None = None,
    prefix: str = "cluster",
    first: int = 0,
) -> dict[str, np.ndarray]:
    """Indices of the particles of each requested cluster selection (labels ``< 0`` are in none).

    :param clusters: ``None``: one subset per cluster (``cluster_000``, ...); otherwise a list
        whose items are a cluster id or a list of ids merged into one subset
        (``clusters_001_004``).
    :param prefix: name stem (``cluster``; e.g. ``class`` for a method's own labels).
    :param first: the number label 0 carries in the names (1: ``class_001`` holds label 0, as
        RELION numbers classes); ``clusters`` ids stay 0-based labels.
    """
    labels = np.asarray(labels).ravel()
    k = int(labels.max()) + 1 if labels.size else 0
    width = max(3, len(str(max(k - 1 + first, 0))))
    selections: Iterable = [[c] for c in range(k)] if clusters is None else clusters
    out: dict[str, np.ndarray] = {}
    for sel in selections:
        ids = [int(c) for c in (sel if isinstance(sel, Iterable) and not isinstance(sel, str) else [sel])]
        bad = [c for c in ids if not 0 <= c < k]
        if bad:
            raise ValueError(f"subsets.clusters: cluster ids {bad} out of range 0..{k - 1}")
        stem = prefix if len(ids) == 1 else prefix + ("es" if prefix.endswith("s") else "s")
        name = f"{stem}_" + "_".join(f"{c + first:0{width}d}" for c in ids)
        out[name] = np.flatnonzero(np.isin(labels, ids))
    return out
