"""Fixtures for the physics tests: analytic Gaussian-blob volumes and the cryoDRGN toy data.

The toy pose pickle is read with a restricted unpickler that only admits numpy arrays (and
the builtin containers around them): pose pickles are user data and must never be loaded
with plain ``pickle.load``.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch


def _numpy_reconstruct():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_scalar():
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    return scalar


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only numpy ndarray/dtype/scalar reconstruction and builtin tuple/dict/list."""

    _NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")

    def find_class(self, module: str, name: str):
        if module in self._NUMPY_MODULES and name == "_reconstruct":
            return _numpy_reconstruct()
        if module in self._NUMPY_MODULES and name == "scalar":
            return _numpy_scalar()
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "builtins" and name in ("tuple", "dict", "list"):
            return {"tuple": tuple, "dict": dict, "list": list}[name]
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def restricted_load(path: Path):
    with open(path, "rb") as fh:
        return RestrictedUnpickler(fh).load()


def read_mrc(path: Path) -> np.ndarray:
    import mrcfile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cryoDRGN files have non-standard headers
        with mrcfile.open(path, permissive=True) as mrc:
            return np.array(mrc.data, dtype=np.float32)


@dataclass
class ToyData:
    volume: torch.Tensor  # (30, 30, 30) float32, [z, y, x]
    projections: torch.Tensor  # (1000, 30, 30) float32
    rotations: torch.Tensor  # (1000, 3, 3) float32, cryoDRGN's rot == RELION's A
    trans: torch.Tensor  # (1000, 2) fraction of box (NOT applied to the images)


@pytest.fixture(scope="session")
def toy_data(conformance_dir: Path) -> ToyData:
    rot, trans = restricted_load(conformance_dir / "toy_rot_trans.pkl")
    return ToyData(
        volume=torch.from_numpy(read_mrc(conformance_dir / "toymodel_small_nocenter.mrc")),
        projections=torch.from_numpy(read_mrc(conformance_dir / "toy_projections.mrcs")),
        rotations=torch.from_numpy(np.asarray(rot, dtype=np.float32)),
        trans=torch.from_numpy(np.asarray(trans, dtype=np.float32)),
    )


def gaussian_blobs(
    box_size: int,
    centers_xyz: Sequence[Sequence[float]],
    sigmas: Sequence[float],
    amplitudes: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``(D, D, D)`` volume ``[z, y, x]``: sum of isotropic Gaussians centred at ``(x, y, z)``
    pixel offsets from the rotation centre ``D // 2``."""
    axis = torch.arange(box_size, dtype=torch.float64) - box_size // 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    amplitudes = amplitudes if amplitudes is not None else [1.0] * len(sigmas)
    vol = torch.zeros(box_size, box_size, box_size, dtype=torch.float64)
    for (cx, cy, cz), sigma, amp in zip(centers_xyz, sigmas, amplitudes):
        r2 = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2
        vol += amp * torch.exp(-r2 / (2 * sigma**2))
    return vol.to(dtype)


@pytest.fixture
def blob_volume() -> Callable[..., torch.Tensor]:
    """Factory for :func:`gaussian_blobs`."""
    return gaussian_blobs


@pytest.fixture(scope="session")
def restricted_unpickler() -> type[pickle.Unpickler]:
    """The restricted unpickler class (for tests of the helper itself)."""
    return RestrictedUnpickler
