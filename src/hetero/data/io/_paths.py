"""Resolve the stack names written in metadata files to absolute paths (shared by readers)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd


def _candidates(name: str, bases: Sequence[str], datadir: Path | None) -> list[tuple[str, str]]:
    """``(candidate path, what it was resolved against)`` in the order they are tried."""
    base = os.path.basename(name)
    out: list[tuple[str, str]] = []
    if os.path.isabs(name):
        out.append((name, "absolute name"))
        if datadir is not None:
            out.append((os.path.join(datadir, base), f"datadir {datadir} (file name only)"))
        return out
    if datadir is not None:
        out += [(os.path.join(datadir, name), f"datadir {datadir}"),
                (os.path.join(datadir, base), f"datadir {datadir} (file name only)")]
    out += [(os.path.join(b, name), b) for b in bases]
    return out


def resolve_names(
    names: Iterable[str],
    bases: Sequence[str | Path],
    datadir: str | Path | None = None,
    matched: dict[str, str | None] | None = None,
) -> dict[str, str]:
    """Map each distinct stack ``name`` to an absolute, normalised path.

    Candidates, in order: an absolute name as is (then ``datadir/<basename>`` when given); a
    relative name against ``datadir`` and then ``datadir/<basename>`` (when given), then against
    each of ``bases`` in turn. The first candidate that exists wins; when none exists the first
    candidate is returned, so that the missing-file error names the most likely location.

    :param matched: if given, filled with ``name -> what the name was resolved against`` (a
        folder, ``"absolute name"`` or the datadir), ``None`` when no candidate exists.
    """
    dirs: list[str] = []
    for b in bases:
        b = os.path.abspath(b)
        if b not in dirs:
            dirs.append(b)
    ddir = Path(os.path.abspath(datadir)) if datadir is not None else None
    out: dict[str, str] = {}
    for name in names:
        if name in out:
            continue
        cands = [(os.path.normpath(os.path.abspath(c)), w) for c, w in _candidates(name, dirs, ddir)]
        found = next(((c, w) for c, w in cands if os.path.exists(c)), None)
        out[name] = found[0] if found else cands[0][0]
        if matched is not None:
            matched[name] = found[1] if found else None
    return out


def describe_matches(source: str | Path, matched: dict[str, str | None]) -> str | None:
    """One log line: what the stack names of ``source`` were resolved against (``None`` if
    there is nothing to say)."""
    counts: dict[str, int] = {}
    for where in matched.values():
        if where is not None:
            counts[where] = counts.get(where, 0) + 1
    if not counts:
        return None
    parts = [f"{n} against {w}" for w, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    missing = sum(w is None for w in matched.values())
    tail = f"; {missing} not found" if missing else ""
    return f"{source}: image stack names resolved: {', '.join(parts)}{tail}"


def resolve_column(
    names: np.ndarray | Sequence[str],
    bases: Sequence[str | Path],
    datadir: str | Path | None,
    matched: dict[str, str | None] | None = None,
) -> np.ndarray:
    """Per-row absolute paths (object array) for per-row stack ``names`` (see :func:`resolve_names`)."""
    codes, uniques = pd.factorize(pd.Series(np.asarray(names, dtype=object)))
    mapping = resolve_names([str(u) for u in uniques], bases, datadir, matched)
    resolved = np.array([mapping[str(u)] for u in uniques], dtype=object)
    return resolved[codes] if len(codes) else np.zeros(0, dtype=object)


def default_bases(metadata_file: str | Path, levels: int | None = None) -> list[Path]:
    """The metadata file's folder, the working directory, then its parent folders (all of them,
    or up to ``levels``), nearest first.

    RELION resolves image names against its project directory (the working directory of the
    job, usually two levels above ``Refine3D/job012/run_data.star``); cryoSPARC against the
    project directory (one level above ``J24/particles.cs``). A subset written deeper inside
    the project (``hetero_run/analysis/subsets/x.star``) still finds the project root.
    """
    folder = Path(os.path.abspath(metadata_file)).parent
    bases = [folder, Path.cwd()]
    parent = folder
    while parent.parent != parent and (levels is None or len(bases) < levels + 2):
        parent = parent.parent
        bases.append(parent)
    return bases
