"""RELION STAR particle files (3.0 single block, 3.1+ optics + particles) <-> ParticleTable.

Conventions follow :mod:`hetero.physics.conventions` (RELION is the contract):

- ``rlnAngleRot/Tilt/Psi`` (degrees) -> ``A = Rz(psi) Ry(tilt) Rz(rot)`` (passive ZYZ).
- ``rlnOriginXAngst/YAngst`` (3.1+, Å) are divided by the particle's optics-group pixel size;
  ``rlnOriginX/Y`` (3.0) are already pixels. Both give ``origins_px``.
- CTF columns (``rlnDefocusU/V`` Å, ``rlnDefocusAngle`` deg, ``rlnVoltage`` kV,
  ``rlnSphericalAberration`` mm, ``rlnAmplitudeContrast``, ``rlnPhaseShift`` deg,
  ``rlnCtfBfactor`` Å^2, ``rlnCtfScalefactor``) go into a ``(N, 9)`` table in
  :data:`hetero.physics.ctf.CTF_COLUMNS` order; in 3.1+ files voltage, Cs and amplitude
  contrast come from the particle's optics group.
- ``rlnImageName = idx@stack`` with a 1-based ``idx`` -> 0-based ``image_indices``.
- ``rlnRandomSubset`` 1/2 -> ``half_set`` 0/1.

Example usage::

    table = read_star("Refine3D/job012/run_data.star", datadir="/data/Extract")
    write_star("subset.star", table, indices=np.arange(100))   # RELION 3.1 star
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hetero.data.io._paths import default_bases, describe_matches, resolve_column
from hetero.data.io.errors import InputError, MissingFileError
from hetero.data.io.mrc import ImageStack
from hetero.data.io.star_blocks import STRING_COLUMNS as STRING_COLUMNS
from hetero.data.io.star_blocks import ParsedStar, load_blocks
from hetero.data.io.star_optics import warn_unmodelled_optics
from hetero.data.particles import ParticleTable
from hetero.physics.rotations import euler_to_matrix
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

#: Per-particle columns that only make sense with a defocus.
_CTF_PARTICLE_COLUMNS = (
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnPhaseShift",
    "rlnCtfBfactor",
    "rlnCtfScalefactor",
)
#: Acquisition columns that live in ``data_optics`` in 3.1+ (per particle in 3.0).
_OPTICS_COLUMNS = (
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
    "rlnMagnification",
    "rlnDetectorPixelSize",
    "rlnPixelSize",
)
_ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")


# -- reading -------------------------------------------------------------------------------------
def _split_names(star: ParsedStar) -> tuple[np.ndarray, np.ndarray]:
    """``rlnImageName`` -> (0-based indices (N,), stack names (N,) object)."""
    names = star.df["rlnImageName"].astype(str).str.strip()
    parts = names.str.partition("@")
    no_at = (parts[1] != "@").to_numpy()
    idx = pd.to_numeric(parts[0], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    stacks = parts[2].to_numpy(dtype=object)
    bad = (
        no_at | ~np.isfinite(idx) | (idx < 1) | (idx != np.round(idx)) | (parts[2] == "").to_numpy()
    )
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(
            f"{star.where(star.block, i)}: rlnImageName is {names.iloc[i]!r}; expected "
            "'<index>@<stack>' with a 1-based integer index, e.g. 000001@Extract/particles.mrcs"
        )
    return idx.astype(np.int64) - 1, stacks


def _optics_groups(star: ParsedStar) -> np.ndarray:
    """1-based optics group per particle; sets ``star.group_rows``."""
    optics = star.optics
    if optics is None:
        star.group_rows = np.zeros(star.n, dtype=np.int64)
        if "rlnOpticsGroup" in star.df.columns:
            return star.numeric(star.df, star.block, "rlnOpticsGroup").astype(np.int64)
        return np.ones(star.n, dtype=np.int64)
    if len(optics) == 0:
        raise InputError(f"{star.path}: data_optics is empty; expected one row per optics group")
    if "rlnOpticsGroup" in optics.columns:
        ids = star.numeric(optics, "optics", "rlnOpticsGroup").astype(np.int64)
    elif len(optics) == 1:
        ids = np.ones(1, dtype=np.int64)
    else:
        raise InputError(f"{star.path}: data_optics has {len(optics)} rows but no rlnOpticsGroup")
    if "rlnOpticsGroup" in star.df.columns:
        groups = star.numeric(star.df, star.block, "rlnOpticsGroup").astype(np.int64)
    elif len(optics) == 1:
        groups = np.full(star.n, ids[0], dtype=np.int64)
    else:
        raise InputError(
            f"{star.path}: data_{star.block} has no rlnOpticsGroup column but data_optics has "
            f"{len(optics)} groups; expected each particle to name its optics group"
        )
    lookup = {int(g): r for r, g in enumerate(ids)}
    rows = np.array([lookup.get(int(g), -1) for g in groups], dtype=np.int64)
    if (rows < 0).any():
        i = int(np.argmax(rows < 0))
        raise InputError(
            f"{star.where(star.block, i)}: rlnOpticsGroup {int(groups[i])} is not defined in "
            f"data_optics (groups there: {sorted(lookup)})"
        )
    star.group_rows = rows
    return groups


def _pixel_size(star: ParsedStar, fallback: float | None) -> np.ndarray:
    apix = star.per_particle("rlnImagePixelSize")
    if apix is None:
        apix = star.per_particle("rlnPixelSize")
    if apix is None:
        det = star.per_particle("rlnDetectorPixelSize")
        mag = star.per_particle("rlnMagnification")
        if det is not None and mag is not None:
            apix = det * 1e4 / np.where(mag > 0, mag, np.nan)  # µm and magnification -> Å
    if apix is None:
        if fallback is None:
            where = "data_optics" if star.optics is not None else f"data_{star.block}"
            raise InputError(
                f"{star.path}: no pixel size found; add a column rlnImagePixelSize (Å/px) to "
                f"{where} (or rlnDetectorPixelSize and rlnMagnification), or pass "
                "pixel_size_angstrom (config: data.pixel_size_angstrom)"
            )
        return np.full(star.n, float(fallback))
    bad = ~(apix > 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(
            f"{star.path}: particle row {i + 1} has pixel size {apix[i]!r} Å; expected > 0"
        )
    if fallback is not None and np.any(np.abs(apix - fallback) > 1e-3 * fallback):
        raise InputError(
            f"{star.path}: pixel_size_angstrom={fallback} was given but the file says "
            f"{sorted(set(np.round(apix, 6).tolist()))[:5]} Å/px; remove the override or fix "
            "the file"
        )
    return apix


def _pair(star: ParsedStar, x: str, y: str) -> np.ndarray | None:
    has_x, has_y = star.has(x), star.has(y)
    if has_x != has_y:
        missing = y if has_x else x
        raise InputError(f"{star.path}: column {missing} is missing (found only one of {x}, {y})")
    if not has_x:
        return None
    return np.stack([star.per_particle(x), star.per_particle(y)], axis=1)


def _rotations(star: ParsedStar) -> np.ndarray | None:
    present = [c for c in _ANGLE_COLUMNS if c in star.df.columns]
    if not present or present == ["rlnAnglePsi"]:
        return None  # no poses (a 2-D classification has only an in-plane angle)
    missing = [c for c in _ANGLE_COLUMNS if c not in present]
    if missing:
        raise InputError(
            f"{star.path}: column {missing[0]} is missing from data_{star.block} (Euler angles "
            f"need all of {', '.join(_ANGLE_COLUMNS)})"
        )
    euler = np.stack([star.numeric(star.df, star.block, c) for c in _ANGLE_COLUMNS], axis=1)
    return euler_to_matrix(torch.from_numpy(euler)).numpy().astype(np.float64)


#: Acquisition values a user may state when the file lacks them (config key, unit).
ACQUISITION_OVERRIDES = {
    "rlnVoltage": ("voltage_kv", "kV"),
    "rlnSphericalAberration": ("spherical_aberration_mm", "mm"),
    "rlnAmplitudeContrast": ("amplitude_contrast", ""),
}
_TYPICAL = {"rlnVoltage": 300, "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1}


def _acquisition(star: ParsedStar, column: str, override: float | None) -> np.ndarray:
    """``column`` per particle, or the user's ``override`` when the file lacks it."""
    key, unit = ACQUISITION_OVERRIDES[column]
    values = star.per_particle(column)
    if values is None:
        if override is None:
            where = "data_optics or " if star.optics is not None else ""
            raise InputError(
                f"{star.path}: column {column} is missing from {where}data_{star.block} (needed "
                f"for the CTF); pass data.{key}=<value{' in ' + unit if unit else ''}> (typical: "
                f"{_TYPICAL[column]}) if you know it, or add the column"
            )
        log.info(f"{star.path}: no {column}; using data.{key}={override}")
        return np.full(star.n, float(override))
    if override is not None and np.any(np.abs(values - override) > 1e-6 * max(1.0, abs(override))):
        raise InputError(
            f"{star.path}: data.{key}={override} was given but the file's {column} says "
            f"{sorted(set(np.round(values, 6).tolist()))[:5]}; remove the override or fix the file"
        )
    return values


def _ctf(star: ParsedStar, overrides: dict[str, float | None]) -> np.ndarray | None:
    cols = star.df.columns
    if "rlnDefocusU" not in cols:
        extra = [c for c in _CTF_PARTICLE_COLUMNS if c in cols]
        if star.optics is None:
            extra += [c for c in ("rlnVoltage", "rlnSphericalAberration") if c in cols]
        if extra:
            raise InputError(
                f"{star.path}: column rlnDefocusU is missing from data_{star.block} but CTF "
                f"columns ({', '.join(extra)}) are present; expected rlnDefocusU and rlnDefocusV"
            )
        return None
    n = star.n
    why = "needed for the CTF"
    du = star.numeric(star.df, star.block, "rlnDefocusU")
    dv = star.require("rlnDefocusV", why)
    angle = star.per_particle("rlnDefocusAngle")
    phase = star.per_particle("rlnPhaseShift")
    bfac = star.per_particle("rlnCtfBfactor")
    scale = star.per_particle("rlnCtfScalefactor")
    return np.stack(
        [
            du,
            dv,
            np.zeros(n) if angle is None else angle,
            _acquisition(star, "rlnVoltage", overrides.get("rlnVoltage")),
            _acquisition(star, "rlnSphericalAberration", overrides.get("rlnSphericalAberration")),
            _acquisition(star, "rlnAmplitudeContrast", overrides.get("rlnAmplitudeContrast")),
            np.zeros(n) if phase is None else phase,
            np.zeros(n) if bfac is None else bfac,
            np.ones(n) if scale is None else scale,
        ],
        axis=1,
    )


def _half_set(star: ParsedStar) -> np.ndarray | None:
    if "rlnRandomSubset" not in star.df.columns:
        return None
    subset = star.numeric(star.df, star.block, "rlnRandomSubset")
    bad = (subset != 1) & (subset != 2)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(
            f"{star.where(star.block, i)}: rlnRandomSubset is {subset[i]:g}; expected 1 or 2"
        )
    return (subset - 1).astype(np.int8)


def _box_size(star: ParsedStar, first_stack: str) -> int | None:
    """From ``rlnImageSize``, else from the first stack's header; ``None`` when neither exists
    (metadata-only reads work; :func:`~hetero.data.io.readers.read_particles` then needs the
    stacks and reads the box from them)."""
    sizes = star.per_particle("rlnImageSize")
    if sizes is None:
        try:
            return ImageStack(first_stack).box_size
        except MissingFileError:
            return None
    unique = np.unique(sizes.astype(np.int64))
    if len(unique) > 1:
        raise InputError(
            f"{star.path}: optics groups have different image sizes {unique.tolist()} "
            "(rlnImageSize); hetero needs one box size: re-extract at a common size or split "
            "the file by optics group"
        )
    return int(unique[0])


def read_star(
    path: str | Path,
    datadir: str | Path | None = None,
    pixel_size_angstrom: float | None = None,
    voltage_kv: float | None = None,
    spherical_aberration_mm: float | None = None,
    amplitude_contrast: float | None = None,
) -> ParticleTable:
    """Read a RELION 3.0 or 3.1+ particle STAR file.

    Image names ``idx@stack`` are resolved: absolute paths as they are; relative ones against
    ``datadir`` then ``datadir/<basename>`` (when given), then against the STAR file's folder,
    the working directory and every folder above the STAR file (RELION's project directory for
    ``Refine3D/job012/run_data.star``); the first that exists wins, and the log says which.
    Existence is not required here (see :func:`hetero.data.io.readers.read_particles`); without
    ``rlnImageSize`` and without the first stack, ``box_size`` is ``None``.

    Every loop row must hold one value per column (:func:`~hetero.data.io.star_check.check_loop_rows`).
    RELION 4/5 tomography files are refused. Optics corrections hetero does not model (beam tilt,
    Zernike terms, anisotropic magnification) are named in one warning.

    :param path: the ``.star`` file.
    :param datadir: folder holding the stacks when they were moved.
    :param pixel_size_angstrom: pixel size (Å) used only when the file has none; an explicit
        value that contradicts the file raises.
    :param voltage_kv, spherical_aberration_mm, amplitude_contrast: the same for
        ``rlnVoltage``, ``rlnSphericalAberration`` and ``rlnAmplitudeContrast`` (common gaps in
        RELION 3.0 files; config ``data.voltage_kv`` etc.).
    :return: a :class:`ParticleTable` with ``rows`` (the particle DataFrame) and, for 3.1+
        files, ``optics`` (the optics DataFrame); ``extra["star_version"]`` is ``"3.0"`` or
        ``"3.1"``.
    :raises InputError: naming the file, line/row and column of what is missing or malformed.
    """
    path = Path(path)
    particles, block, optics = load_blocks(path)
    star = ParsedStar(path, particles, block, optics)
    if star.n == 0:
        raise InputError(f"{path}: data_{block} contains no particles (the loop has no rows)")
    indices, names = _split_names(star)
    groups = _optics_groups(star)
    apix = _pixel_size(star, pixel_size_angstrom)
    matched: dict[str, str | None] = {}
    image_paths = resolve_column(names, default_bases(path), datadir, matched)
    note = describe_matches(path, matched)
    if note:
        log.info(note)
    box = _box_size(star, str(image_paths[0]))
    overrides = {
        "rlnVoltage": voltage_kv,
        "rlnSphericalAberration": spherical_aberration_mm,
        "rlnAmplitudeContrast": amplitude_contrast,
    }
    warn_unmodelled_optics(path, particles, optics)
    origins_angst = _pair(star, "rlnOriginXAngst", "rlnOriginYAngst")
    if origins_angst is not None:
        origins = origins_angst / apix[:, None]
    else:
        origins = _pair(star, "rlnOriginX", "rlnOriginY")
        if origins is None:
            origins = np.zeros((star.n, 2))
    return ParticleTable(
        image_paths=image_paths,
        image_indices=indices,
        box_size=box,
        pixel_size_angstrom=apix,
        rotations=_rotations(star),
        origins_px=origins,
        ctf=_ctf(star, overrides),
        half_set=_half_set(star),
        optics_group=groups,
        optics=optics,
        rows=particles,
        source=str(path),
        extra={"star_version": "3.1" if optics is not None else "3.0", "star_block": block},
    )


from hetero.data.io.star_writer import write_star  # noqa: E402  (re-exported; writes STAR)

__all__ = ["read_star", "write_star"]
