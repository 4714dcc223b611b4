"""cryoSPARC ``.cs`` particle files (numpy structured arrays) -> ParticleTable.

Mapping to RELION's conventions (:mod:`hetero.physics.conventions`):

- ``alignments3D/pose`` is a rotation vector ``w`` (axis * angle, radians);
  ``R = expm([w]_x)`` (Rodrigues) and RELION's ``A = R.T`` (as cryoDRGN's
  ``parse_pose_csparc``, which transposes ``expmap(w)``).
- ``alignments3D/shift`` (pixels) is RELION's origin: ``origins_px = shift``. When
  ``alignments3D/psize_A`` differs from ``blob/psize_A`` the shift is rescaled to blob pixels.
- ``ctf/df1_A``/``df2_A`` -> defocus U/V (Å); ``ctf/df_angle_rad`` and ``ctf/phase_shift_rad``
  -> degrees; ``ctf/accel_kv``, ``ctf/cs_mm``, ``ctf/amp_contrast``; ``ctf/bfactor`` (Å^2, default
  0) and ``ctf/scale`` (default 1).
- ``blob/idx`` is 0-based; ``blob/path`` is bytes, a leading ``>`` (relative to the cryoSPARC
  project directory) is stripped.
- ``alignments3D/split`` (0/1) -> ``half_set``.
- ``blob/sign`` (``-1`` for the usual dark-protein extraction) -> ``image_sign``: the
  dataset multiplies the pixels by it, which brings them to hetero's white density
  (:mod:`hetero.physics.conventions`); logged.
- ``alignments3D/alpha`` (cryoSPARC's per-particle amplitude scale) multiplies the CTF scale;
  ``ctf/anisomag``, ``ctf/tetra_A``, ``ctf/shift_A``, ``ctf/trefoil_A`` are not modelled and are
  named in one warning (:mod:`hetero.data.io.star_optics`).

Large headers: a ``.cs`` from a job with many classes carries per-class fields and a numpy
header of tens of kB, beyond numpy's default limit; it is read with a 1 MiB limit, still with
``allow_pickle=False`` (the header is parsed by ``ast.literal_eval``, nothing is executed).

Example usage::

    table = read_cs("P12/J24/J24_particles.cs", datadir="/data/P12")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hetero.data.io._paths import default_bases, describe_matches, resolve_column
from hetero.data.io.errors import InputError, MissingFileError
from hetero.data.io.star_optics import warn_unmodelled_cs_fields
from hetero.data.particles import ParticleTable
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

#: numpy header limit for ``.cs`` files (numpy's default, 10,000 bytes, refuses the header of
#: a 100-class job's particles, about 33 kB).
MAX_HEADER_BYTES = 2**20

_CTF_REQUIRED = (
    "ctf/df1_A",
    "ctf/df2_A",
    "ctf/df_angle_rad",
    "ctf/accel_kv",
    "ctf/cs_mm",
    "ctf/amp_contrast",
)


def rotvec_to_matrix(rotvec: np.ndarray) -> np.ndarray:
    """Rodrigues' formula: ``(..., 3)`` rotation vectors (radians) -> ``(..., 3, 3)`` ``expm([w]_x)``.

    Computed in float64; exact to rounding also for tiny angles (first-order expansion).
    """
    w = np.asarray(rotvec, dtype=np.float64)
    theta = np.linalg.norm(w, axis=-1)[..., None, None]
    wx, wy, wz = w[..., 0], w[..., 1], w[..., 2]
    zero = np.zeros_like(wx)
    k = np.stack(
        [
            np.stack([zero, -wz, wy], -1),
            np.stack([wz, zero, -wx], -1),
            np.stack([-wy, wx, zero], -1),
        ],
        -2,
    )
    small = theta < 1e-8
    safe = np.where(small, 1.0, theta)
    a = np.where(small, 1.0 - theta**2 / 6.0, np.sin(safe) / safe)
    b = np.where(small, 0.5 - theta**2 / 24.0, (1.0 - np.cos(safe)) / safe**2)
    eye = np.broadcast_to(np.eye(3), k.shape)
    return eye + a * k + b * (k @ k)


def _field(data: np.ndarray, name: str) -> np.ndarray | None:
    return data[name] if name in data.dtype.names else None


def _finite(path: Path, name: str, values: np.ndarray, decimal: bool = False) -> np.ndarray:
    """``values`` as float64, raising on NaN/inf. ``decimal``: float32 values are taken at their
    shortest decimal representation (``2.95`` rather than ``2.9500000477``)."""
    values = np.asarray(values)
    if decimal and values.dtype == np.float32:
        values = values.astype(str)
    values = values.astype(np.float64)
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(
            f"{path}: field {name} of row {i} (0-based) is {values[i]!r}; expected finite"
        )
    return values


def read_cs(path: str | Path, datadir: str | Path | None = None) -> ParticleTable:
    """Read a cryoSPARC particle ``.cs`` file (``np.load`` with ``allow_pickle=False``).

    Stack paths are resolved against ``datadir`` (then ``datadir/<basename>``) when given, then
    the ``.cs`` file's folder, the working directory and the folders above (cryoSPARC's project
    directory). Poses are ``None`` when ``alignments3D/pose`` is absent, the CTF is ``None`` when
    no ``ctf/*`` field is present.

    :return: a :class:`ParticleTable`; ``extra["blob_sign"]`` holds ``blob/sign`` when present.
    :raises InputError: a required field is missing (the message lists the fields found) or a
        value is malformed.
    """
    path = Path(path)
    data = _load_records(path)
    image_paths, idx = _stacks(path, data, datadir)
    box, apix = _box_and_pixel_size(path, data)
    rotations, origins = _poses(path, data, apix)
    ctf = _ctf(path, data)
    half = _half_sets(path, data)

    names = data.dtype.names
    warn_unmodelled_cs_fields(path, {f: data[f] for f in names if f.startswith("ctf/")})
    extra: dict = {"format": "cryosparc"}
    image_sign = _image_sign(path, _field(data, "blob/sign"))
    if image_sign is not None:
        extra["blob_sign"] = image_sign
    return ParticleTable(
        image_paths=image_paths,
        image_indices=idx,
        box_size=box,
        pixel_size_angstrom=apix,
        rotations=rotations,
        origins_px=origins,
        ctf=ctf,
        half_set=half,
        image_sign=image_sign,
        source=str(path),
        extra=extra,
    )


def _load_records(path: Path) -> np.ndarray:
    """The particle records of ``path`` (1-D structured array with ``blob/path`` and
    ``blob/idx``, at least one row)."""
    if not path.is_file():
        raise MissingFileError(f"{path}: cryoSPARC .cs file does not exist")
    try:
        data = np.load(path, allow_pickle=False, max_header_size=MAX_HEADER_BYTES)
    except Exception as err:
        raise InputError(
            f"{path}: not a cryoSPARC .cs file (numpy structured array): "
            f"{type(err).__name__}: {err}"
        ) from None
    if not isinstance(data, np.ndarray) or data.dtype.names is None or data.ndim != 1:
        raise InputError(f"{path}: expected a 1-D numpy structured array of particle records")
    names = data.dtype.names
    found = ", ".join(names)
    missing = [f for f in ("blob/path", "blob/idx") if f not in names]
    if missing:
        raise InputError(f"{path}: missing field(s) {', '.join(missing)}; fields found: {found}")
    if len(data) == 0:
        raise InputError(f"{path}: contains no particles")
    return data


def _stacks(
    path: Path, data: np.ndarray, datadir: str | Path | None
) -> tuple[np.ndarray, np.ndarray]:
    """``(image_paths, image_indices)``: ``blob/path`` resolved (matches logged) and
    ``blob/idx`` (0-based)."""
    raw_paths = data["blob/path"]
    stack_names = np.array(
        [(p.decode() if isinstance(p, bytes) else str(p)).strip().lstrip(">") for p in raw_paths],
        dtype=object,
    )
    empty = stack_names == ""
    if empty.any():
        raise InputError(f"{path}: blob/path of row {int(np.argmax(empty))} (0-based) is empty")
    matched: dict[str, str | None] = {}
    image_paths = resolve_column(stack_names, default_bases(path), datadir, matched)
    note = describe_matches(path, matched)
    if note:
        log.info(note)
    idx = data["blob/idx"].astype(np.int64)
    if (idx < 0).any():
        raise InputError(f"{path}: blob/idx of row {int(np.argmax(idx < 0))} is negative")
    return image_paths, idx


def _box_and_pixel_size(path: Path, data: np.ndarray) -> tuple[int, np.ndarray]:
    """``(box, apix)``: the one square box size (``blob/shape``, px) and the per-particle pixel
    size (``blob/psize_A``, Å)."""
    n = len(data)
    found = ", ".join(data.dtype.names)
    shape = _field(data, "blob/shape")
    if shape is None:
        raise InputError(f"{path}: missing field blob/shape (image size); fields found: {found}")
    shape = np.asarray(shape, dtype=np.int64).reshape(n, -1)
    if shape.shape[1] != 2 or (shape[:, 0] != shape[:, 1]).any():
        i = int(np.argmax(shape[:, 0] != shape[:, -1])) if shape.shape[1] == 2 else 0
        raise InputError(
            f"{path}: blob/shape of row {i} is {shape[i].tolist()}; expected square images [D, D]"
        )
    boxes = np.unique(shape[:, 0])
    if len(boxes) > 1:
        raise InputError(
            f"{path}: particles have different box sizes {boxes.tolist()} (blob/shape); hetero "
            "needs one box size"
        )
    box = int(boxes[0])
    psize = _field(data, "blob/psize_A")
    if psize is None:
        raise InputError(f"{path}: missing field blob/psize_A (pixel size); fields found: {found}")
    apix = _finite(path, "blob/psize_A", psize, decimal=True)
    if (apix <= 0).any():
        raise InputError(f"{path}: blob/psize_A of row {int(np.argmax(apix <= 0))} is not > 0")
    return box, apix


def _poses(
    path: Path, data: np.ndarray, apix: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray]:
    """``(rotations, origins_px)``: RELION's ``A = expm([w]_x).T`` of ``alignments3D/pose``
    (``None`` when absent) and ``alignments3D/shift`` in blob pixels (zeros when absent)."""
    n = len(data)
    rotations = None
    origins = np.zeros((n, 2))
    pose = _field(data, "alignments3D/pose")
    if pose is not None:
        rotvec = _finite(path, "alignments3D/pose", pose).reshape(n, -1)
        if rotvec.shape[1] != 3:
            raise InputError(
                f"{path}: alignments3D/pose has {rotvec.shape[1]} values per row; expected 3"
            )
        rotations = np.ascontiguousarray(rotvec_to_matrix(rotvec).transpose(0, 2, 1))
    shift = _field(data, "alignments3D/shift")
    if shift is not None:
        origins = _finite(path, "alignments3D/shift", shift).reshape(n, -1)
        if origins.shape[1] != 2:
            raise InputError(
                f"{path}: alignments3D/shift has {origins.shape[1]} values per row; expected 2"
            )
        align_psize = _field(data, "alignments3D/psize_A")
        if align_psize is not None:
            ratio = _finite(path, "alignments3D/psize_A", align_psize, True) / apix
            if np.any(np.abs(ratio - 1.0) > 1e-4):
                log.warning(
                    f"{path}: alignments3D/psize_A differs from blob/psize_A; shifts rescaled to "
                    "blob pixels"
                )
                origins = origins * ratio[:, None]
    return rotations, origins


def _ctf(path: Path, data: np.ndarray) -> np.ndarray | None:
    """The ``(n, 9)`` CTF table of the ``ctf/*`` fields (``None`` when there are none); angles in
    degrees, ``alignments3D/alpha`` folded into the scale."""
    names = data.dtype.names
    n = len(data)
    ctf = None
    ctf_fields = [f for f in names if f.startswith("ctf/")]
    if ctf_fields:
        missing = [f for f in _CTF_REQUIRED if f not in names]
        if missing:
            raise InputError(
                f"{path}: CTF field(s) {', '.join(missing)} missing; ctf fields found: "
                f"{', '.join(ctf_fields)}"
            )

        def get(name: str, default: float) -> np.ndarray:
            values = _field(data, name)
            return np.full(n, default) if values is None else _finite(path, name, values, True)

        alpha = _field(data, "alignments3D/alpha")
        scale = get("ctf/scale", 1.0)
        if alpha is not None:
            scale = scale * _finite(path, "alignments3D/alpha", alpha, True)
        ctf = np.stack(
            [
                get("ctf/df1_A", 0.0),
                get("ctf/df2_A", 0.0),
                np.rad2deg(get("ctf/df_angle_rad", 0.0)),
                get("ctf/accel_kv", 0.0),
                get("ctf/cs_mm", 0.0),
                get("ctf/amp_contrast", 0.0),
                np.rad2deg(get("ctf/phase_shift_rad", 0.0)),
                get("ctf/bfactor", 0.0),
                scale,
            ],
            axis=1,
        )
    return ctf


def _half_sets(path: Path, data: np.ndarray) -> np.ndarray | None:
    """``alignments3D/split`` (0/1) as ``int8`` half sets; ``None`` when absent."""
    half = None
    split = _field(data, "alignments3D/split")
    if split is not None:
        split = np.asarray(split, dtype=np.int64)
        bad = (split != 0) & (split != 1)
        if bad.any():
            i = int(np.argmax(bad))
            raise InputError(
                f"{path}: alignments3D/split of row {i} is {split[i]}; expected 0 or 1"
            )
        half = split.astype(np.int8)
    return half


def _image_sign(path: Path, sign: np.ndarray | None) -> np.ndarray | None:
    """``blob/sign`` as ``image_sign`` (+1/-1 per particle), logged; other values raise."""
    if sign is None:
        return None
    sign = _finite(path, "blob/sign", sign)
    bad = (sign != 1.0) & (sign != -1.0)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(f"{path}: blob/sign of row {i} (0-based) is {sign[i]:g}; expected 1 or -1")
    n_neg = int((sign < 0).sum())
    if n_neg:
        log.info(
            f"{path}: blob/sign is -1 for {n_neg} of {len(sign)} particles (dark protein, "
            "cryoSPARC's default); their pixels are multiplied by -1 to give white density"
        )
    return sign
