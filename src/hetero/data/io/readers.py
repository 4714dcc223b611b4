"""One entry point for every particle input: dispatch on the suffix, then validate cheaply.

=============== =========================================================================
suffix          read as
=============== =========================================================================
``.star``       RELION 3.0 / 3.1+ (:func:`hetero.data.io.star.read_star`)
``.cs``         cryoSPARC (:func:`hetero.data.io.cryosparc.read_cs`)
``.mrcs/.mrc``  one image stack; poses/CTF from cryoDRGN pickles (or none)
``.txt``        stack paths, one per line (``#`` comments and blank lines skipped; relative
                paths against ``datadir`` or the list's folder); poses/CTF from pickles
=============== =========================================================================

Validation (headers only, no pixels): every stack exists, is square with the table's box
size, and holds every referenced image; no NaN/inf in the metadata.
:func:`validate_pixels` then reads a small random sample of images.

Example usage::

    table = read_particles("run_data.star", datadir="/data/Extract")
    validate_pixels(table, n_sample=64)
    table = read_particles("hand.mrcs", poses="hand_rot.pkl", pixel_size_angstrom=1.0)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hetero.data.io._paths import resolve_names
from hetero.data.io.cryodrgn import SHIFT_UNITS, read_cryodrgn_ctf, read_cryodrgn_poses
from hetero.data.io.cryosparc import read_cs
from hetero.data.io.errors import InputError, MissingFileError
from hetero.data.io.mrc import ImageStack, StackCollection, read_header
from hetero.data.io.star import read_star
from hetero.data.particles import ParticleTable
from hetero.utils.memory import release_freed_memory
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

#: Suffixes :func:`read_particles` understands.
SUFFIXES = (".star", ".cs", ".mrcs", ".mrc", ".txt")


def _stack_list(path: Path, datadir: str | Path | None) -> list[str]:
    """Absolute stack paths listed in a ``.txt`` file (missing stacks raise, naming the line)."""
    lines = path.read_text().splitlines()
    entries = [(i + 1, s.strip()) for i, s in enumerate(lines)]
    entries = [(i, s) for i, s in entries if s and not s.startswith("#")]
    if not entries:
        raise InputError(f"{path}: the stack list is empty (expected one .mrcs path per line)")
    bases = [path.parent.resolve(), Path.cwd()]
    mapping = resolve_names([s for _, s in entries], bases, datadir)
    out = []
    for lineno, name in entries:
        resolved = mapping[name]
        if not Path(resolved).is_file():
            raise MissingFileError(
                f"{path}, line {lineno}: image stack {name} does not exist (looked for "
                f"{resolved}); pass datadir=<folder holding the stacks> if they were moved"
            )
        out.append(resolved)
    return out


def _stack_table(
    path: Path, stacks: list[str], ctf: str | Path | None, pixel_size_angstrom: float | None
) -> ParticleTable:
    paths, indices = [], []
    box = None
    apix_header = None
    for s in stacks:
        stack = ImageStack(s)
        n, d, _ = stack.shape
        if box is None:
            box, apix_header = d, stack.pixel_size_angstrom
        elif d != box:
            raise InputError(
                f"{s}: images are {d} x {d} px but {stacks[0]} has {box} x {box}; all stacks must "
                "share one box size"
            )
        paths.append(np.full(n, s, dtype=object))
        indices.append(np.arange(n, dtype=np.int64))
    image_paths = np.concatenate(paths)
    image_indices = np.concatenate(indices)
    n_total = len(image_indices)
    ctf_table = None
    apix = None
    if ctf is not None:
        ctf_table, ctf_box, apix = read_cryodrgn_ctf(ctf)
        if len(ctf_table) != n_total:
            raise InputError(
                f"{ctf}: CTF table has {len(ctf_table)} rows but {path} holds {n_total} images"
            )
        if ctf_box != box:
            raise InputError(
                f"{ctf}: CTF table says box size {ctf_box} but the images are {box} px"
            )
    if pixel_size_angstrom is not None:
        if apix is not None and np.any(
            np.abs(apix - pixel_size_angstrom) > 1e-3 * pixel_size_angstrom
        ):
            log.warning(
                f"pixel_size_angstrom={pixel_size_angstrom} overrides the Apix column of {ctf}"
            )
        apix = np.full(n_total, float(pixel_size_angstrom))
    elif apix is None:
        if not apix_header or apix_header <= 0:
            raise InputError(
                f"{stacks[0]}: the MRC header has no pixel size; pass pixel_size_angstrom "
                "(config: data.pixel_size_angstrom) or a cryoDRGN CTF pickle (data.ctf)"
            )
        apix = np.full(n_total, float(apix_header))
    return ParticleTable(
        image_paths=image_paths,
        image_indices=image_indices,
        box_size=int(box),
        pixel_size_angstrom=apix,
        ctf=ctf_table,
        source=str(path),
        extra={"format": "stack"},
    )


def _apply_pickles(
    table: ParticleTable,
    path: Path,
    poses: str | Path | None,
    ctf: str | Path | None,
    shift_units: str = "fraction",
) -> ParticleTable:
    n = len(table)
    if poses is not None:
        rotations, origins = read_cryodrgn_poses(poses, table.box_size, shift_units)
        if len(rotations) != n:
            raise InputError(f"{poses}: {len(rotations)} poses but {path} has {n} particles")
        if table.rotations is not None:
            log.warning(f"poses from {poses} replace the poses in {path}")
        table.rotations, table.origins_px = rotations, origins
    if ctf is not None and table.extra.get("format") != "stack":
        ctf_table, ctf_box, _ = read_cryodrgn_ctf(ctf)
        if len(ctf_table) != n:
            raise InputError(f"{ctf}: {len(ctf_table)} CTF rows but {path} has {n} particles")
        if table.ctf is not None:
            log.warning(f"CTF parameters from {ctf} replace those in {path}")
        table.ctf = ctf_table
    return table


_ACQUISITION = (("voltage_kv", 3), ("spherical_aberration_mm", 4), ("amplitude_contrast", 5))


def _check_acquisition(table: ParticleTable, given: dict[str, float | None]) -> None:
    """Stated acquisition values against a non-STAR input's CTF table (STAR files apply them)."""
    for key, column in _ACQUISITION:
        value = given.get(key)
        if value is None:
            continue
        if table.ctf is None:
            raise InputError(
                f"{table.source}: data.{key}={value} was given but the input has no CTF "
                "parameters to apply it to (pass a CTF with data.ctf=<cryoDRGN CTF pickle>)"
            )
        found = table.ctf[:, column]
        if np.any(np.abs(found - value) > 1e-6 * max(1.0, abs(value))):
            raise InputError(
                f"{table.source}: data.{key}={value} was given but the input says "
                f"{sorted(set(np.round(found, 6).tolist()))[:5]}; remove the override"
            )


def _resolve_box(table: ParticleTable, path: Path) -> None:
    """A star without ``rlnImageSize``: the box from the first stack's header."""
    if table.box_size is not None or len(table) == 0:
        return
    first = str(table.image_paths[0])
    try:
        table.box_size = ImageStack(first).box_size
    except MissingFileError:
        raise MissingFileError(
            f"{path}: the file has no rlnImageSize, so the box size is read from the first "
            f"image stack, {first}, which does not exist; pass datadir=<folder holding the "
            "stacks> (config: data.datadir) if they were moved"
        ) from None


def _check_finite(table: ParticleTable) -> None:
    for name in ("pixel_size_angstrom", "rotations", "origins_px", "ctf"):
        values = getattr(table, name)
        if values is None:
            continue
        flat = np.asarray(values, dtype=np.float64).reshape(len(table), -1)
        bad = ~np.isfinite(flat).all(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            raise InputError(f"{table.source}: {name} of particle row {i} (0-based) is NaN or inf")
    if (table.pixel_size_angstrom <= 0).any():
        i = int(np.argmax(table.pixel_size_angstrom <= 0))
        raise InputError(f"{table.source}: pixel size of particle row {i} (0-based) is not > 0")


def check_stacks(table: ParticleTable) -> None:
    """Headers only: each stack exists, has the table's box size and holds its images.

    :raises MissingFileError: naming the first missing stack.
    :raises InputError: naming the stack and the offending index or size.
    """
    if len(table) == 0:
        return
    try:
        table.check_files_exist()
    except FileNotFoundError as err:
        if isinstance(err, InputError):
            raise
        raise MissingFileError(str(err)) from None
    codes, uniques = pd.factorize(pd.Series(table.image_paths, dtype=object))
    max_index = np.full(len(uniques), -1, dtype=np.int64)
    np.maximum.at(max_index, codes, table.image_indices)
    for stack, top in zip(uniques, max_index):
        header = read_header(stack)
        n, ny, nx = header.shape
        if ny != nx:
            raise InputError(
                f"{stack}: images are not square ({ny} x {nx}); expected square images"
            )
        if nx != table.box_size:
            raise InputError(
                f"{stack}: images are {nx} x {nx} px but {table.source or 'the particle table'} "
                f"says box size {table.box_size}"
            )
        if top >= n:
            raise InputError(
                f"{stack}: image index {top} (0-based; {top + 1} in 1-based star notation) is "
                f"referenced by {table.source or 'the particle table'} but the stack holds only "
                f"{n} images"
            )


def read_particles(
    path: str | Path,
    datadir: str | Path | None = None,
    poses: str | Path | None = None,
    ctf: str | Path | None = None,
    pixel_size_angstrom: float | None = None,
    voltage_kv: float | None = None,
    spherical_aberration_mm: float | None = None,
    amplitude_contrast: float | None = None,
    pose_shift_units: str = "fraction",
) -> ParticleTable:
    """Read any supported particle input and validate it (headers and metadata only).

    :param path: ``.star``, ``.cs``, ``.mrcs``/``.mrc`` (one stack) or ``.txt`` (stack list).
    :param datadir: folder to resolve image/stack names against when the stacks were moved.
    :param poses: cryoDRGN pose pickle; for star/cs inputs it replaces their poses (warning).
    :param ctf: cryoDRGN CTF pickle; for star/cs inputs it replaces their CTF (warning).
    :param pixel_size_angstrom: Å/px for inputs that lack it (stack headers often do); for
        stacks it takes precedence over the CTF pickle and the header.
    :param voltage_kv, spherical_aberration_mm, amplitude_contrast: acquisition values for a
        star file that lacks the columns (RELION 3.0 files often lack rlnAmplitudeContrast);
        for other inputs they must agree with the CTF they carry.
    :param pose_shift_units: units of the translations in a cryoDRGN pose pickle,
        ``"fraction"`` (of the box, cryoDRGN's format) or ``"pixels"``.
    :return: the validated :class:`ParticleTable` (input order).
    :raises InputError: (or its subclasses) naming the file and what is wrong, before any
        pixel is read.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(
            f"{path}: unknown particle file type {suffix or '(no suffix)'}; expected one of "
            f"{', '.join(SUFFIXES)}"
        )
    if not path.is_file():
        raise MissingFileError(f"{path}: particle file does not exist")
    if pose_shift_units not in SHIFT_UNITS:
        raise InputError(
            f"data.pose_shift_units={pose_shift_units!r}; expected one of {', '.join(SHIFT_UNITS)}"
        )
    given = {"voltage_kv": voltage_kv, "spherical_aberration_mm": spherical_aberration_mm,
             "amplitude_contrast": amplitude_contrast}
    if suffix == ".star":
        table = read_star(path, datadir=datadir, pixel_size_angstrom=pixel_size_angstrom, **given)
        _resolve_box(table, path)
    elif suffix == ".cs":
        table = read_cs(path, datadir=datadir)
    elif suffix == ".txt":
        table = _stack_table(path, _stack_list(path, datadir), ctf, pixel_size_angstrom)
    else:
        table = _stack_table(path, [str(path.resolve())], ctf, pixel_size_angstrom)
    # The parsers' temporary frames are gone; hand their memory back before workers fork.
    release_freed_memory()
    table = _apply_pickles(table, path, poses, ctf, pose_shift_units)
    if suffix != ".star":
        _check_acquisition(table, given)
    _check_finite(table)
    check_stacks(table)
    return table


def validate_pixels(table: ParticleTable, n_sample: int, seed: int = 0) -> None:
    """Read ``min(n_sample, N)`` random images and raise on NaN/inf.

    :raises InputError: naming the stack, the 0-based image index and the particle row.
    """
    n = min(int(n_sample), len(table))
    if n <= 0:
        return
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(table), size=n, replace=False)
    rows = rows[np.lexsort((table.image_indices[rows], table.image_paths[rows].astype(str)))]
    stacks = StackCollection(max_open=8)
    try:
        for row in rows.tolist():
            stack, index = table.image_paths[row], int(table.image_indices[row])
            image = stacks.read(stack, index)
            if not np.isfinite(image).all():
                raise InputError(
                    f"{stack}: image {index} (0-based; particle row {row} of "
                    f"{table.source or 'the input'}) contains NaN or inf pixel values; re-extract "
                    "or remove it"
                )
    finally:
        stacks.close()
