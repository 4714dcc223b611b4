"""Resolve the stack names written in metadata files to absolute paths (shared by readers)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd


def _candidates(name: str, bases: Sequence[Path], datadir: Path | None) -> list[str]:
    base = os.path.basename(name)
    out: list[str] = []
    if os.path.isabs(name):
        out.append(name)
        if datadir is not None:
            out.append(os.path.join(datadir, base))
        return out
    if datadir is not None:
        out += [os.path.join(datadir, name), os.path.join(datadir, base)]
    out += [os.path.join(b, name) for b in bases]
    return out


def resolve_names(
    names: Iterable[str], bases: Sequence[str | Path], datadir: str | Path | None = None
) -> dict[str, str]:
    """Map each distinct stack ``name`` to an absolute, normalised path.

    Candidates, in order: an absolute name as is (then ``datadir/<basename>`` when given); a
    relative name against ``datadir`` and then ``datadir/<basename>`` (when given), then against
    each of ``bases`` in turn. The first candidate that exists wins; when none exists the first
    candidate is returned, so that the missing-file error names the most likely location.
    """
    dirs = []
    for b in bases:
        b = os.path.abspath(b)
        if b not in dirs:
            dirs.append(b)
    ddir = Path(os.path.abspath(datadir)) if datadir is not None else None
    out: dict[str, str] = {}
    for name in names:
        if name in out:
            continue
        cands = [os.path.normpath(os.path.abspath(c)) for c in _candidates(name, dirs, ddir)]
        out[name] = next((c for c in cands if os.path.exists(c)), cands[0])
    return out


def resolve_column(
    names: np.ndarray | Sequence[str], bases: Sequence[str | Path], datadir: str | Path | None
) -> np.ndarray:
    """Per-row absolute paths (object array) for per-row stack ``names`` (see :func:`resolve_names`)."""
    codes, uniques = pd.factorize(pd.Series(np.asarray(names, dtype=object)))
    mapping = resolve_names([str(u) for u in uniques], bases, datadir)
    resolved = np.array([mapping[str(u)] for u in uniques], dtype=object)
    return resolved[codes] if len(codes) else np.zeros(0, dtype=object)


def default_bases(metadata_file: str | Path, levels: int = 2) -> list[Path]:
    """The metadata file's folder, the working directory, then up to ``levels`` parent folders.

    RELION resolves image names against its project directory (the working directory of the
    job, usually two levels above ``Refine3D/job012/run_data.star``); cryoSPARC against the
    project directory (one level above ``J24/particles.cs``).
    """
    folder = Path(os.path.abspath(metadata_file)).parent
    bases = [folder, Path.cwd()]
    parent = folder
    for _ in range(levels):
        parent = parent.parent
        bases.append(parent)
    return bases
