"""The blocks of a RELION particle STAR file, for :func:`hetero.data.io.star.read_star`.

:func:`load_blocks` parses the file (after :func:`~hetero.data.io.star_check.check_loop_rows`),
refuses tomography files and picks the particle block (``data_particles``, or the loop with
``rlnImageName``) and, in 3.1+ files, ``data_optics``. :class:`ParsedStar` holds them with the
column helpers whose errors name the file, line, row and value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from hetero.data.io.errors import InputError, MissingFileError
from hetero.data.io.star_check import check_loop_rows

__all__ = ["STRING_COLUMNS", "ParsedStar", "load_blocks"]

#: Columns read as text (never converted to numbers by the STAR parser).
STRING_COLUMNS = [
    "rlnImageName",
    "rlnMicrographName",
    "rlnOpticsGroupName",
    "rlnImageOriginalName",
    "rlnReferenceImage",
    "rlnGroupName",
    "rlnMicrographMovieName",
    "rlnCtfImage",
]


def _line_of_row(path: Path, block: str, row: int) -> int | None:
    """1-based line number of data row ``row`` (0-based) of loop ``data_<block>``, if found."""
    try:
        with open(path, errors="replace") as fh:
            in_block = in_loop = False
            seen = -1
            for lineno, line in enumerate(fh, 1):
                s = line.strip()
                if s.startswith("data_"):
                    in_block, in_loop = s == f"data_{block}", False
                    continue
                if not in_block:
                    continue
                if s.startswith("loop_"):
                    in_loop = True
                    continue
                if not in_loop or not s or s.startswith(("#", "_")):
                    continue
                seen += 1
                if seen == row:
                    return lineno
    except OSError:
        return None
    return None


class ParsedStar:
    """One parsed STAR file: the particle block, the optics block and helpers for errors."""

    def __init__(
        self, path: Path, particles: pd.DataFrame, block: str, optics: pd.DataFrame | None
    ):
        self.path = path
        self.df = particles
        self.block = block
        self.optics = optics
        self.n = len(particles)
        self.group_rows: np.ndarray | None = None  # per particle: row of its optics group

    def where(self, block: str, row: int) -> str:
        line = _line_of_row(self.path, block, row)
        at = f", line {line}" if line is not None else ""
        return f"{self.path}{at} (data_{block} row {row + 1})"

    def numeric(self, frame: pd.DataFrame, block: str, column: str) -> np.ndarray:
        """``frame[column]`` as float64; non-numbers and NaN/inf raise naming line and value."""
        raw = frame[column]
        values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.argmax(bad))
            raise InputError(
                f"{self.where(block, i)}: column {column} holds {raw.iloc[i]!r}; expected a "
                "finite number"
            )
        return values

    def has(self, column: str) -> bool:
        return column in self.df.columns or (
            self.optics is not None and column in self.optics.columns
        )

    def per_particle(self, column: str) -> np.ndarray | None:
        """``column`` per particle from the particle block, else from its optics group."""
        if column in self.df.columns:
            return self.numeric(self.df, self.block, column)
        if self.optics is not None and column in self.optics.columns:
            values = self.numeric(self.optics, "optics", column)
            return values[self.group_rows]
        return None

    def require(self, column: str, why: str) -> np.ndarray:
        values = self.per_particle(column)
        if values is None:
            where = "data_optics or " if self.optics is not None else ""
            raise InputError(
                f"{self.path}: column {column} is missing from {where}data_{self.block} "
                f"({why}); columns found: {', '.join(map(str, self.df.columns))}"
            )
        return values


def _refuse_tomography(path: Path, tables: dict[str, pd.DataFrame]) -> None:
    """RELION 4/5 sub-tomogram particle files are not single-particle stars."""
    tomo = sorted({str(c) for t in tables.values() for c in t.columns if str(c).startswith("rlnTomo")})
    if tomo or "general" in tables and "rlnImageName" not in tables.get("particles", pd.DataFrame()):
        shown = ", ".join(tomo[:4]) or "data_general"
        raise InputError(
            f"{path}: a RELION tomography (sub-tomogram) particle file ({shown}); sub-tomogram "
            "data are not supported yet. hetero reads single-particle files: a .star with "
            "rlnImageName = <index>@<stack.mrcs> (e.g. Refine3D/.../run_data.star), a cryoSPARC "
            ".cs, or .mrcs stacks"
        )


def load_blocks(path: Path) -> tuple[pd.DataFrame, str, pd.DataFrame | None]:
    """``(particles, block name, optics or None)`` of the STAR file ``path``."""
    if not path.is_file():
        raise MissingFileError(f"{path}: STAR file does not exist")
    check_loop_rows(path)
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=STRING_COLUMNS)
    except Exception as err:  # the parser's own errors are not InputErrors
        raise InputError(
            f"{path}: could not be parsed as a STAR file ({type(err).__name__}: {err})"
        ) from None
    tables = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    _refuse_tomography(path, tables)
    optics = tables.get("optics")
    if optics is not None and "particles" in tables and "rlnImageName" in tables["particles"]:
        return tables["particles"], "particles", optics
    with_names = [k for k, v in tables.items() if "rlnImageName" in v.columns]
    if with_names:
        block = "particles" if "particles" in with_names else with_names[0]
        return tables[block], block, None
    if "particles" in tables:
        block = "particles"
    elif len(tables) == 1:
        block = next(iter(tables))
    else:
        found = ", ".join(f"data_{k}" for k in blocks) or "none"
        raise InputError(
            f"{path}: no particle block found (expected a loop with column rlnImageName, e.g. "
            f"data_particles); blocks found: {found}"
        )
    columns = ", ".join(map(str, tables[block].columns))
    raise InputError(
        f"{path}: data_{block} has no column rlnImageName (expected 'index@stack.mrcs' image "
        f"names); columns found: {columns}"
    )
