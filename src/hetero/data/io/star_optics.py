"""Optics corrections in particle metadata that hetero's image model does not apply.

hetero's CTF (:mod:`hetero.physics.ctf`) is RELION's ``CTF::getCTF`` with defocus, astigmatism,
Cs, amplitude contrast, phase shift, B-factor and scale. What it does not model, it names in
one warning per file instead of dropping silently:

- RELION 3.1+: beam tilt (``rlnBeamTiltX/Y``), odd and even Zernike aberrations
  (``rlnOddZernike``, ``rlnEvenZernike``), anisotropic magnification (``rlnMagMat00..11``);
- cryoSPARC: ``ctf/anisomag``, ``ctf/tetra_A``, ``ctf/shift_A``, ``ctf/trefoil_A``.

cryoSPARC's per-particle scale ``alignments3D/alpha`` *is* applied (it multiplies the CTF
scale, as ``rlnCtfScalefactor`` does; see :func:`hetero.data.io.cryosparc.read_cs`).

Example usage::

    warn_unmodelled_optics("run_data.star", particles_frame, optics_frame)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
#: RELION column -> value it has when the correction is absent.
RELION_NEUTRAL = {
    "rlnBeamTiltX": 0.0,
    "rlnBeamTiltY": 0.0,
    "rlnOddZernike": 0.0,
    "rlnEvenZernike": 0.0,
    "rlnMagMat00": 1.0,
    "rlnMagMat01": 0.0,
    "rlnMagMat10": 0.0,
    "rlnMagMat11": 1.0,
}
#: cryoSPARC field -> value it has when the correction is absent.
CRYOSPARC_NEUTRAL = {
    "ctf/anisomag": None,  # 2x2 (stored as 4 values): identity-like or zeros mean none
    "ctf/tetra_A": 0.0,
    "ctf/shift_A": 0.0,
    "ctf/trefoil_A": 0.0,
}


def _values(column: pd.Series) -> np.ndarray:
    """Numbers in a column (Zernike columns are text lists like ``[0.1,-0.2]``)."""
    numeric = pd.to_numeric(column, errors="coerce")
    if numeric.notna().all():
        return numeric.to_numpy(dtype=np.float64)
    found = [float(x) for text in column.astype(str) for x in _NUMBER.findall(text)]
    return np.asarray(found, dtype=np.float64)


def _active_relion(frames: list[pd.DataFrame]) -> list[str]:
    active = []
    for name, neutral in RELION_NEUTRAL.items():
        for frame in frames:
            if frame is not None and name in frame.columns:
                values = _values(frame[name])
                if values.size and np.any(np.abs(values - neutral) > 1e-9):
                    active.append(name)
                    break
    return active


def _warn(path: str | Path, active: list[str]) -> None:
    if active:
        log.warning(
            f"{path}: optics corrections hetero does not model are ignored: {', '.join(active)} "
            "(hetero's CTF has defocus, astigmatism, Cs, amplitude contrast, phase shift, "
            "B-factor and scale only); at high resolution the models will not fit them"
        )


def warn_unmodelled_optics(
    path: str | Path, particles: pd.DataFrame, optics: pd.DataFrame | None
) -> list[str]:
    """One warning naming the RELION optics-correction columns with non-neutral values.

    :return: the columns named (empty when none).
    """
    active = _active_relion([particles, optics])
    _warn(path, active)
    return active


def warn_unmodelled_cs_fields(path: str | Path, fields: Mapping[str, np.ndarray]) -> list[str]:
    """The same for a cryoSPARC record array's fields (``name -> values``)."""
    active = []
    for name in CRYOSPARC_NEUTRAL:
        if name not in fields:
            continue
        values = np.asarray(fields[name], dtype=np.float64).reshape(len(fields[name]), -1)
        if name == "ctf/anisomag":
            flat = values.reshape(len(values), -1)
            neutral = np.all(np.abs(flat) < 1e-9) or (
                flat.shape[1] == 4 and np.allclose(flat, [1.0, 0.0, 0.0, 1.0], atol=1e-9)
            )
            if not neutral:
                active.append(name)
        elif np.any(np.abs(values) > 1e-9):
            active.append(name)
    _warn(path, active)
    return active
