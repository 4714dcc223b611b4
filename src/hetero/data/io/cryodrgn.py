"""cryoDRGN pose and CTF pickles, read through a restricted unpickler (never plain ``pickle.load``).

A pickle can run arbitrary code when loaded. :func:`safe_load_pickle` only admits the globals
that numpy arrays, numpy scalars and dtypes need, plus ``tuple``/``list``/``dict``; anything
else (``os.system``, ``builtins.eval``, ``pathlib.Path``...) raises
:class:`pickle.UnpicklingError` *before* it is called.

Mapping to RELION's conventions (:mod:`hetero.physics.conventions`):

- pose pickles ``(rot (N, 3, 3), trans (N, 2))`` or ``rot`` alone: ``rot`` *is* RELION's ``A``;
  ``trans`` is RELION's origin as a fraction of the box, ``origins_px = trans * D``
  (``shift_units="fraction"``, cryoDRGN's format since 0.3); old pickles stored pixels
  (``shift_units="pixels"``: ``origins_px = trans``). A particle centre outside the image
  (``|origin| > D / 2`` on either axis) is an error naming the row and the option, which is
  how a pixel-valued pickle read as fractions shows.
- CTF pickles ``(N, 9) = (D, Apix, dfU, dfV, dfAng, kV, Cs, w, phase_shift)`` with RELION's units
  (Å, degrees, kV, mm) -> :data:`hetero.physics.ctf.CTF_COLUMNS` order with B-factor 0, scale 1.

Example usage::

    rotations, origins_px = read_cryodrgn_poses("poses.pkl", box_size=128)
    ctf, box, apix = read_cryodrgn_ctf("ctf.pkl")
"""

from __future__ import annotations

import builtins
import codecs
import importlib
import pickle
from pathlib import Path

import numpy as np

from hetero.data.io.errors import InputError, MissingFileError, UnsafePickleError
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

#: ``(module, name)`` pairs the restricted unpickler resolves (numpy 1.x and 2.x spellings).
ALLOWED_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "tuple"),
        ("builtins", "list"),
        ("builtins", "dict"),
        ("_codecs", "encode"),  # protocol <= 2 stores bytes as codecs.encode(str, "latin1")
    }
    | {
        (f"{core}.{module}", name)
        for core in ("numpy.core", "numpy._core")
        for module, name in (
            ("multiarray", "_reconstruct"),
            ("multiarray", "scalar"),
            ("numeric", "_frombuffer"),  # protocol 5 arrays
        )
    }
)


def _numpy_global(module: str, name: str):
    """Resolve an allowed numpy global without importing deprecated ``numpy.core`` aliases."""
    if module == "numpy":
        return getattr(np, name)
    submodule = module.split(".")[-1]
    for core in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{core}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise UnsafePickleError(f"cannot resolve {module}.{name} in this numpy version")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` admits only :data:`ALLOWED_GLOBALS`.

    :param file: binary file object.
    :param source: name used in error messages (the file path).
    """

    def __init__(self, file, source: str = "<pickle>") -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self.source}: refusing to load global '{module}.{name}' from a pickle; only "
                "numpy arrays, tuples, lists and dicts are allowed (the file may be malicious or "
                "not a cryoDRGN pickle)"
            )
        if module == "builtins":
            return getattr(builtins, name)
        if module == "_codecs":
            return codecs.encode
        return _numpy_global(module, name)


def safe_load_pickle(path: str | Path):
    """Load a pickle holding only numpy arrays/scalars, tuples, lists and dicts.

    :raises MissingFileError: the file does not exist.
    :raises UnsafePickleError: (an :class:`InputError` and a ``pickle.UnpicklingError``) the
        pickle references any other global (named in the message, with the file); nothing
        from it has been executed.
    :raises InputError: the file is not a readable pickle.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: pickle file does not exist")
    with open(path, "rb") as fh:
        try:
            return RestrictedUnpickler(fh, source=str(path)).load()
        except pickle.UnpicklingError:
            raise
        except Exception as err:
            raise InputError(
                f"{path}: could not be read as a pickle ({type(err).__name__}: {err})"
            ) from None


def _array(path: Path, obj, what: str) -> np.ndarray:
    if not isinstance(obj, np.ndarray) or obj.dtype.kind not in "fiu":
        raise InputError(
            f"{path}: {what} is a {type(obj).__name__}"
            f"{f' of dtype {obj.dtype}' if isinstance(obj, np.ndarray) else ''}; expected a "
            "numeric numpy array"
        )
    values = obj.astype(np.float64)
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1) if values.ndim else []
    if np.any(bad):
        raise InputError(f"{path}: {what} row {int(np.argmax(bad))} (0-based) has NaN or inf")
    return values


SHIFT_UNITS = ("fraction", "pixels")


def read_cryodrgn_poses(
    path: str | Path, box_size: int, shift_units: str = "fraction"
) -> tuple[np.ndarray, np.ndarray]:
    """Read a cryoDRGN pose pickle.

    :param path: pickle of ``(rot (N, 3, 3), trans (N, 2))`` or of ``rot`` alone.
    :param box_size: side ``D`` (pixels) of the images the translations refer to.
    :param shift_units: ``"fraction"`` (of the box, cryoDRGN's format) or ``"pixels"``.
    :return: ``(rotations (N, 3, 3) float64`` RELION ``A``, ``origins_px (N, 2) float64)`` with
        ``origins_px = trans * D`` or ``trans`` (zeros without ``trans``).
    :raises InputError: wrong structure/shapes, NaN, matrices that are not rotations, or a
        shift that puts the particle centre outside the image.
    """
    if shift_units not in SHIFT_UNITS:
        raise InputError(
            f"data.pose_shift_units={shift_units!r}; expected one of {', '.join(SHIFT_UNITS)}"
        )
    path = Path(path)
    obj = safe_load_pickle(path)
    trans = None
    if isinstance(obj, (tuple, list)):
        if len(obj) == 2:
            rot, trans = obj
        elif len(obj) == 1:
            (rot,) = obj
        else:
            raise InputError(
                f"{path}: pose pickle holds a {type(obj).__name__} of {len(obj)} items; expected "
                "(rotations (N,3,3), translations (N,2)) or rotations alone"
            )
    else:
        rot = obj
    rot = _array(path, rot, "rotations")
    if rot.ndim != 3 or rot.shape[1:] != (3, 3):
        raise InputError(f"{path}: rotations have shape {rot.shape}; expected (N, 3, 3)")
    n = len(rot)
    err = np.abs(rot @ rot.transpose(0, 2, 1) - np.eye(3)).reshape(n, -1).max(axis=1)
    det = np.linalg.det(rot)
    bad = (err > 1e-3) | (np.abs(det - 1.0) > 1e-3)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(
            f"{path}: matrix {i} (0-based) is not a proper rotation (|R R^T - I| = {err[i]:.2g}, "
            f"det = {det[i]:.4g})"
        )
    if trans is None:
        return rot, np.zeros((n, 2))
    trans = _array(path, trans, "translations")
    if trans.shape != (n, 2):
        raise InputError(
            f"{path}: translations have shape {trans.shape}; expected ({n}, 2) to match the "
            f"{n} rotations"
        )
    origins = trans * float(box_size) if shift_units == "fraction" else trans
    outside = np.abs(origins).max(axis=1) > box_size / 2 if n else np.zeros(0, dtype=bool)
    if outside.any():
        i = int(np.argmax(outside))
        other = "pixels" if shift_units == "fraction" else "fraction"
        raise InputError(
            f"{path}: translation of row {i} (0-based) is {trans[i].tolist()}, read as "
            f"{'a fraction of the box (cryoDRGN' + chr(39) + 's convention)' if shift_units == 'fraction' else 'pixels'}"
            f": an origin of {np.round(origins[i], 2).tolist()} px puts the particle "
            f"centre outside the {box_size}-px image. If the pickle stores {other} (older "
            f"cryoDRGN pose pickles stored pixels), pass data.pose_shift_units={other}"
        )
    return rot, origins


def read_cryodrgn_ctf(path: str | Path) -> tuple[np.ndarray, int, np.ndarray]:
    """Read a cryoDRGN CTF pickle ``(N, 9) = (D, Apix, dfU, dfV, dfAng, kV, Cs, w, phase_shift)``.

    :return: ``(ctf (N, 9) float64`` in :data:`~hetero.physics.ctf.CTF_COLUMNS` order
        (defocus U/V Å, angle deg, kV, Cs mm, amplitude contrast, phase shift deg, B-factor 0,
        scale 1), ``box_size`` int, ``pixel_size_angstrom (N,) float64)``.
    :raises InputError: wrong shape, NaN, mixed box sizes or non-positive pixel sizes.
    """
    path = Path(path)
    raw = safe_load_pickle(path)
    table = _array(path, raw, "CTF table")
    if raw.dtype == np.float32:  # keep each value's shortest decimal (300 kV, 0.1, 2.7 mm)
        table = raw.astype(str).astype(np.float64)
    if table.ndim != 2 or table.shape[1] != 9:
        raise InputError(
            f"{path}: CTF table has shape {table.shape}; expected (N, 9) columns D, Apix, dfU, "
            "dfV, dfAng, kV, Cs, w, phase_shift"
        )
    n = len(table)
    if n == 0:
        raise InputError(f"{path}: CTF table has no rows")
    boxes = np.unique(table[:, 0])
    if len(boxes) > 1 or boxes[0] <= 0 or boxes[0] != round(boxes[0]):
        raise InputError(
            f"{path}: column 0 (box size D) holds {boxes[:5].tolist()}; expected one positive "
            "integer"
        )
    apix = table[:, 1].copy()
    if (apix <= 0).any():
        raise InputError(f"{path}: column 1 (Apix) of row {int(np.argmax(apix <= 0))} is not > 0")
    ctf = np.concatenate([table[:, 2:9], np.zeros((n, 1)), np.ones((n, 1))], axis=1)
    return ctf, int(boxes[0]), apix
