"""Write particle subsets as RELION 3.1 STAR files that open where they are written (and in RELION).

:func:`write_star` keeps what the input said and replaces what the model changed:

- the original particle rows (and the original optics table of a 3.1+ input) are kept, so a
  subset drops back into the RELION project it came from;
- the poses are the table's: when ``rotations`` / ``origins_px`` differ from the rows' Euler
  angles / origins (poses replaced from a cryoDRGN pickle, refined by a model), the angle and
  origin columns are rewritten from the arrays, the same way for 3.0 and 3.1 inputs;
- image names open from the written file: a name is kept when it resolves from the output's
  folder or one above it (the reader's rule, :func:`hetero.data.io._paths.default_bases`,
  without the working directory, as the file may be opened from anywhere) to the same stack
  (a subset written inside the RELION project keeps RELION's project-relative names);
  otherwise it is written as an absolute path. A table
  built from arrays (no names of its own) gets absolute names, except for stacks inside the
  output folder (hetero's own data written beside its star file), which are named relative to it.
  RELION resolves a relative name against the directory it runs in, not the star's, so a name
  relative to the output folder would open in hetero but not in RELION.

Example usage::

    write_star("subsets/cluster_000.star", table, indices=np.flatnonzero(labels == 0))
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hetero.data.io._paths import resolve_names
from hetero.data.io.errors import InputError
from hetero.data.io.star import _ANGLE_COLUMNS, _OPTICS_COLUMNS
from hetero.data.particles import ParticleTable
from hetero.physics.rotations import euler_to_matrix, matrix_to_euler
from hetero.utils.files import atomic_write
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)


def _format_column(values: pd.Series) -> list[str]:
    """STAR text of one column: ints as ints, floats at their shortest exact representation
    (always with a ``.`` or exponent, e.g. ``300.0``), strings quoted when empty or with blanks."""
    if pd.api.types.is_bool_dtype(values) or pd.api.types.is_integer_dtype(values):
        return values.to_numpy(dtype=np.int64).astype(str).tolist()
    if pd.api.types.is_float_dtype(values):
        return values.to_numpy(dtype=np.float64, na_value=np.nan).astype(str).tolist()
    text = values.astype(str)
    quote = (text == "") | text.str.contains(r"\s", regex=True)
    if quote.any():
        text = text.where(~quote, '"' + text + '"')
    return text.tolist()


def _format_block(name: str, frame: pd.DataFrame) -> str:
    lines = ["", "# version 30001", "", f"data_{name}", "", "loop_"]
    lines += [f"_{col} #{i + 1}" for i, col in enumerate(frame.columns)]
    columns = [_format_column(frame[c]) for c in frame.columns]
    lines += ["\t".join(row) for row in zip(*columns)]
    return "\n".join(lines) + "\n\n"


def _write_blocks(path: Path, blocks: Sequence[tuple[str, pd.DataFrame]]) -> Path:
    text = "".join(_format_block(name, frame) for name, frame in blocks)
    return atomic_write(path, lambda p: p.write_text(text))


def _optics_from_arrays(table: ParticleTable, idx: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Optics groups from unique (pixel size, voltage, Cs, amplitude contrast)."""
    apix = table.pixel_size_angstrom[idx]
    keys = [apix]
    if table.ctf is not None:
        keys += [table.ctf[idx, 3], table.ctf[idx, 4], table.ctf[idx, 5]]
    stacked = np.round(np.stack(keys, axis=1), 6)
    unique, inverse = np.unique(stacked, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    # Number the groups in order of first appearance.
    first = np.array([np.argmax(inverse == g) for g in range(len(unique))], dtype=np.int64)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    groups = rank[inverse] + 1
    unique = unique[order]
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": np.arange(1, len(unique) + 1, dtype=np.int64),
            "rlnOpticsGroupName": [f"opticsGroup{g}" for g in range(1, len(unique) + 1)],
        }
    )
    if table.ctf is not None:
        optics["rlnAmplitudeContrast"] = unique[:, 3]
        optics["rlnSphericalAberration"] = unique[:, 2]
        optics["rlnVoltage"] = unique[:, 1]
    optics["rlnImagePixelSize"] = unique[:, 0]
    if table.box_size is not None:
        optics["rlnImageSize"] = np.full(len(unique), int(table.box_size), dtype=np.int64)
    optics["rlnImageDimensionality"] = np.full(len(unique), 2, dtype=np.int64)
    return optics, groups.astype(np.int64)


_NOTED_FOLDERS: set[Path] = set()


def _portable_names(
    table: ParticleTable, idx: np.ndarray, names: Sequence[str] | None, out: Path
) -> list[str]:
    """``rlnImageName`` for rows ``idx`` that resolves, from ``out``, to the table's stacks."""
    folder = Path(os.path.abspath(out)).parent  # not resolve(): the bases below are not resolved either
    paths = table.image_paths[idx]
    stacks = [str(n).partition("@")[2] for n in names] if names is not None else [None] * len(idx)
    # One decision per (original stack name, stack path) pair.
    pairs = {(s, p) for s, p in zip(stacks, paths)}
    kept_names = [s for s, _ in pairs if s is not None]
    # the output's folder and those above it (the reader's bases without the working
    # directory): a name kept must resolve from the file itself, wherever it is opened from
    resolved = resolve_names(kept_names, [folder, *folder.parents]) if kept_names else {}
    chosen: dict[tuple, str] = {}
    rewritten = 0
    for s, p in pairs:
        if s is not None and os.path.realpath(resolved[s]) == os.path.realpath(p):  # same file, links followed
            chosen[(s, p)] = s
            continue
        stack = Path(os.path.abspath(p))
        if s is None and folder in stack.parents:  # hetero's own stack written beside the file
            chosen[(s, p)] = stack.relative_to(folder).as_posix()
            continue
        chosen[(s, p)] = str(stack)
        rewritten += s is not None
    if rewritten and folder not in _NOTED_FOLDERS:
        # Once per output folder: a subset per cluster would otherwise repeat it K times.
        _NOTED_FOLDERS.add(folder)
        log.info(
            f"Star files in {folder}: image names written as absolute paths (the input's names "
            "do not resolve from this folder or one above it), so RELION and hetero open them "
            "from any directory"
        )
    return [f"{i + 1:06d}@{chosen[(s, p)]}" for i, s, p in zip(table.image_indices[idx], stacks, paths)]


def _pose_columns(table: ParticleTable, idx: np.ndarray) -> dict[str, np.ndarray]:
    """RELION 3.1 pose columns of rows ``idx`` from the table's arrays."""
    cols: dict[str, np.ndarray] = {}
    if table.rotations is not None:
        euler = matrix_to_euler(torch.from_numpy(np.asarray(table.rotations[idx], np.float64)), eps=1e-12)
        cols["rlnAngleRot"], cols["rlnAngleTilt"], cols["rlnAnglePsi"] = euler.numpy().T
    origins = np.zeros((len(idx), 2)) if table.origins_px is None else table.origins_px[idx]
    apix = table.pixel_size_angstrom[idx]
    cols["rlnOriginXAngst"] = origins[:, 0] * apix
    cols["rlnOriginYAngst"] = origins[:, 1] * apix
    return cols


def _rows_poses_changed(table: ParticleTable, rows: pd.DataFrame, idx: np.ndarray) -> tuple[bool, bool]:
    """(angles differ, origins differ) between the original rows and the table's arrays."""
    angles = table.rotations is not None and (
        not all(c in rows.columns for c in _ANGLE_COLUMNS)
        or not np.allclose(
            euler_to_matrix(torch.from_numpy(rows[list(_ANGLE_COLUMNS)].to_numpy(np.float64))).numpy(),
            table.rotations[idx], atol=1e-9, rtol=0,
        )
    )
    apix = table.pixel_size_angstrom[idx][:, None]
    if {"rlnOriginXAngst", "rlnOriginYAngst"} <= set(rows.columns):
        row_px = rows[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(np.float64) / apix
    elif {"rlnOriginX", "rlnOriginY"} <= set(rows.columns):
        row_px = rows[["rlnOriginX", "rlnOriginY"]].to_numpy(np.float64)
    else:
        row_px = np.zeros((len(idx), 2))
    origins = table.origins_px[idx] if table.origins_px is not None else np.zeros((len(idx), 2))
    return angles, not np.allclose(row_px, origins, atol=1e-9, rtol=0)


def _particles_from_arrays(
    table: ParticleTable, idx: np.ndarray, groups: np.ndarray, out: Path
) -> pd.DataFrame:
    cols: dict[str, object] = {
        "rlnImageName": _portable_names(table, idx, None, out),
        "rlnOpticsGroup": groups,
    }
    cols.update(_pose_columns(table, idx))
    if table.ctf is not None:
        ctf = table.ctf[idx]
        cols["rlnDefocusU"] = ctf[:, 0]
        cols["rlnDefocusV"] = ctf[:, 1]
        cols["rlnDefocusAngle"] = ctf[:, 2]
        cols["rlnPhaseShift"] = ctf[:, 6]
        cols["rlnCtfBfactor"] = ctf[:, 7]
        cols["rlnCtfScalefactor"] = ctf[:, 8]
    if table.half_set is not None:
        cols["rlnRandomSubset"] = table.half_set[idx].astype(np.int64) + 1
    return pd.DataFrame(cols)


def _updated_rows(table: ParticleTable, idx: np.ndarray, out: Path) -> pd.DataFrame:
    """The input's rows ``idx`` with portable image names and the table's poses."""
    subset = table.rows.iloc[idx].reset_index(drop=True)
    subset["rlnImageName"] = _portable_names(
        table, idx, subset["rlnImageName"].astype(str).tolist(), out
    )
    angles, origins = _rows_poses_changed(table, subset, idx)
    poses = _pose_columns(table, idx)
    if angles:
        for c in _ANGLE_COLUMNS:
            subset[c] = poses[c]
    if origins:
        subset = subset.drop(columns=["rlnOriginX", "rlnOriginY"], errors="ignore")
        subset["rlnOriginXAngst"] = poses["rlnOriginXAngst"]
        subset["rlnOriginYAngst"] = poses["rlnOriginYAngst"]
    if angles or origins:
        log.info(f"{out}: poses written from the model's table (they differ from the input rows)")
    return subset


def write_star(
    path: str | Path,
    table: ParticleTable,
    indices: np.ndarray | Sequence[int] | None = None,
    columns: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write particles ``indices`` (default all, in that order) as a RELION 3.1 STAR file.

    - Table read from a 3.1+ STAR file (``rows`` and ``optics`` set): the original particle rows
      (subset) and the original optics table.
    - Table read from a 3.0 STAR file (``rows`` set, no ``optics``): the original rows, with
      per-particle acquisition columns moved into a new ``data_optics`` and ``rlnOriginX/Y``
      (px) converted to ``rlnOriginXAngst/YAngst``.
    - Otherwise columns are built from the arrays: optics groups from unique (pixel size,
      voltage, Cs, amplitude contrast); Euler angles from :func:`matrix_to_euler`; origins in
      Å; CTF columns; ``rlnRandomSubset`` when ``half_set`` is set.

    In every case the poses are the table's and the image names open from ``path`` (module
    docstring). Written atomically; floats at their shortest exact representation.

    ``columns``: particle columns to add or replace, ``{name: (N,) array}`` over all ``N``
    particles of the table (e.g. ``rlnClassNumber`` from a classification).

    :raises InputError: ``path`` is the table's own input file (inputs are never overwritten).
    :raises ValueError: a column that is not ``(N,)``.
    :return: ``path``.
    """
    path = Path(path)
    if table.source and os.path.realpath(path) == os.path.realpath(table.source):
        raise InputError(
            f"{path}: refusing to overwrite the input file the particles were read from; "
            "choose another output path"
        )
    n = len(table)
    idx = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"write_star {path}: indices out of range for {n} particles")
    for name, values in (columns or {}).items():
        if np.shape(values) != (n,):
            raise ValueError(f"write_star {path}: column {name} must be ({n},), got {np.shape(values)}")
    rows, optics = table.rows, table.optics
    if rows is not None and optics is not None:
        return _write_blocks(path, [("optics", optics),
                                    ("particles", _with_columns(_updated_rows(table, idx, path), columns, idx))])
    new_optics, groups = _optics_from_arrays(table, idx)
    built = _particles_from_arrays(table, idx, groups, path)
    if rows is not None:  # RELION 3.0 rows: keep names and extra columns, convert the rest
        subset = _updated_rows(table, idx, path)
        drop = set(_OPTICS_COLUMNS) | {"rlnOriginX", "rlnOriginY"}
        built["rlnImageName"] = subset["rlnImageName"].to_numpy()
        for col in subset.columns:
            if col not in built.columns and col not in drop:
                built[col] = subset[col].to_numpy()
    return _write_blocks(path, [("optics", new_optics), ("particles", _with_columns(built, columns, idx))])


def _with_columns(particles, columns: Mapping[str, np.ndarray] | None, idx: np.ndarray):
    """``particles`` (a DataFrame of the rows ``idx``) with ``columns`` (over all particles) set."""
    if columns:
        particles = particles.copy()
        for name, values in columns.items():
            particles[name] = np.asarray(values)[idx]
    return particles
