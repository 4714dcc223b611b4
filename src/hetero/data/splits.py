"""Train/validation split, half sets, normalisation and contrast of the data module
(:class:`~hetero.data.datamodule.ParticleDataModule`).

They are made once at ``setup`` (seeded), saved to the split file (``data.split_file``,
``.npz``) and in checkpoints (``state_dict``), and restored from either (resume, analysis)
after checking they match the particle table (count and :func:`fingerprint`).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetero.data.dataset import ParticleDataset, estimate_normalization
from hetero.data.io.errors import InputError
from hetero.data.particles import ParticleTable
from hetero.utils.files import atomic_write
from hetero.utils.pylogger import RankedLogger

# the data module's logger: these notes are part of its setup
log = RankedLogger("hetero.data.datamodule")

__all__ = ["SplitStateMixin", "as_numpy", "fingerprint", "make_split", "random_half_sets"]


def make_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random train/validation split of ``n`` particles: sorted ``(train, val)`` rows
    (``int64``); at least one particle stays in training."""
    n_val = int(round(val_fraction * n))
    n_val = min(n_val, n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def random_half_sets(n: int, seed: int) -> np.ndarray:
    """Seeded random 50/50 half sets (``int8`` 0/1) of ``n`` particles."""
    perm = np.random.default_rng(seed).permutation(n)
    halves = np.zeros(n, dtype=np.int8)
    halves[perm[n // 2 :]] = 1
    return halves


def fingerprint(table: ParticleTable) -> int:
    """CRC32 of the image indices: tells particle lists of equal length apart."""
    return zlib.crc32(np.ascontiguousarray(table.image_indices, dtype=np.int64).tobytes())


def as_numpy(x) -> np.ndarray:
    """``x`` (tensor, array or sequence) as a NumPy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class SplitStateMixin:
    """Split, half sets, normalisation and contrast of
    :class:`~hetero.data.datamodule.ParticleDataModule`: made, saved and restored."""

    # -- made at setup ------------------------------------------------------------------------
    def _make_split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return make_split(n, self.val_fraction, self.split_seed)

    def _make_half_sets(self, table: ParticleTable) -> tuple[np.ndarray, str]:
        if table.half_set is not None:
            return np.asarray(table.half_set, dtype=np.int8), "input"
        return random_half_sets(len(table), self.half_sets_seed), "random"

    def _check_contrast(self, path: str) -> bool:
        """``invert_contrast="auto"``: measure the contrast sign (module :mod:`hetero.data.contrast`)."""
        from hetero.data.contrast import measure_contrast

        if self.table.rotations is None:
            log.warning(
                f"{path}: data.invert_contrast=auto needs poses to check the contrast; keeping "
                "the stored contrast (pass data.invert_contrast=true|false to state it)"
            )
            return False
        probe = ParticleDataset(
            self.table, box_size=self.box_size, indices=self.train_indices, scale=self.norm_scale
        )
        check = measure_contrast(probe, seed=self.split_seed)
        self.contrast_check = check
        log.info(f"{path}: {check.describe()}")
        if check.invert is None:
            raise InputError(
                f"{path}: data.invert_contrast=auto could not tell whether the protein is white "
                f"or black ({check.describe()}); pass data.invert_contrast=false (white density, "
                "RELION's convention) or data.invert_contrast=true (black density)"
            )
        if check.invert:
            log.warning(f"{path}: the particles have black density; inverting them (white density)")
        return bool(check.invert)

    def _estimate_norm(self) -> tuple[float, float]:
        if not self.normalize:
            return 0.0, 1.0
        probe = ParticleDataset(self.table, box_size=self.box_size, indices=self.train_indices)
        _, std = estimate_normalization(probe, self.norm_sample_size, seed=self.split_seed)
        if not std > 0:
            raise InputError(
                f"{self.particles_path}: the sampled images are constant (std 0); cannot "
                "normalise them (are the stacks empty?)"
            )
        return 0.0, 1.0 / std

    # -- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Split, half sets and normalisation (tensors and plain numbers: safe for
        ``torch.load(weights_only=True)``)."""
        if self.table is None:
            return {}
        return {
            "n_particles": len(self.table),
            "fingerprint": fingerprint(self.table),
            "train_indices": torch.from_numpy(self.train_indices.copy()),
            "val_indices": torch.from_numpy(self.val_indices.copy()),
            "half_sets": torch.from_numpy(np.asarray(self.table.half_set, np.int8).copy()),
            "half_sets_source": self.half_sets_source,
            "norm_mean": self.norm_mean,
            "norm_scale": self.norm_scale,
            "box_size": int(self.box_size or self.table.box_size),
            "invert_contrast": self.invert_contrast,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the split and normalisation of a checkpoint (before or after ``setup``)."""
        if not state_dict:
            return
        if self.table is None:
            self._pending_state = dict(state_dict)
            return
        self._apply_state(state_dict)
        self._build_datasets()

    def _apply_state(self, state: dict[str, Any]) -> None:
        n = len(self.table)
        if int(state["n_particles"]) != n:
            raise InputError(
                f"checkpoint data state is for {int(state['n_particles'])} particles but "
                f"{self.particles_path or self.table.source} has {n}: resume with the same input"
            )
        box = int(self.box_size or self.table.box_size)
        if int(state.get("box_size", box)) != box:
            raise InputError(
                f"checkpoint was trained at box {int(state['box_size'])} px but data.box_size "
                f"gives {box} px: resume with the same data.box_size"
            )
        self.train_indices = as_numpy(state["train_indices"])
        self.val_indices = as_numpy(state["val_indices"])
        self.table.half_set = as_numpy(state["half_sets"]).astype(np.int8)
        self.half_sets_source = str(state.get("half_sets_source", self.half_sets_source))
        self.norm_mean = float(state["norm_mean"])
        self.norm_scale = float(state["norm_scale"])
        if isinstance(state.get("invert_contrast"), bool):
            self.invert_contrast = state["invert_contrast"]

    # -- split file ---------------------------------------------------------------------------
    def _load_split_file(self, table: ParticleTable) -> dict | None:
        if not self.split_file or not Path(self.split_file).is_file():
            return None
        with np.load(self.split_file, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
        n = len(table)
        saved_n = int(data["n_particles"])
        if saved_n != n:
            raise InputError(
                f"split file {self.split_file} was made for {saved_n} particles but "
                f"{table.source or 'the input'} has {n}; delete it or set data.split_file to a "
                "new path"
            )
        if "fingerprint" in data and int(data["fingerprint"]) != fingerprint(table):
            raise InputError(
                f"split file {self.split_file} was made for a different particle list "
                f"(same count {n}, different image indices); delete it or set data.split_file"
            )
        train = data["train_indices"].astype(np.int64)
        val = data["val_indices"].astype(np.int64)
        both = np.concatenate([train, val])
        if both.size != n or np.unique(both).size != n or both.min() < 0 or both.max() >= n:
            raise InputError(
                f"split file {self.split_file} is inconsistent: train+val must cover each of the "
                f"{n} particles exactly once"
            )
        if abs(float(data.get("val_fraction", self.val_fraction)) - self.val_fraction) > 1e-12:
            log.warning(
                f"split file {self.split_file} was made with val_fraction="
                f"{float(data['val_fraction'])}; reusing it (data.val_fraction={self.val_fraction} "
                "ignored)"
            )
        box = int(self.box_size or table.box_size)
        norm = None
        if (
            "norm_scale" in data
            and int(data.get("norm_box_size", -1)) == box
            and bool(data.get("normalize", self.normalize)) == self.normalize
        ):
            norm = (float(data["norm_mean"]), float(data["norm_scale"]))
        log.info(f"Reusing the train/val split and half sets of {self.split_file}")
        invert = bool(data["invert_contrast"]) if "invert_contrast" in data else None
        return {
            "invert_contrast": invert,
            "train": train,
            "val": val,
            "halves": data["half_sets"].astype(np.int8),
            "source": str(data.get("half_sets_source", "input")),
            "norm": norm,
        }

    def _save_split_file(self) -> None:
        if not self.split_file:
            return
        arrays = {
            "n_particles": np.int64(len(self.table)),
            "fingerprint": np.int64(fingerprint(self.table)),
            "train_indices": self.train_indices,
            "val_indices": self.val_indices,
            "half_sets": np.asarray(self.table.half_set, np.int8),
            "half_sets_source": np.str_(self.half_sets_source),
            "val_fraction": np.float64(self.val_fraction),
            "split_seed": np.int64(self.split_seed),
            "half_sets_seed": np.int64(self.half_sets_seed),
            "normalize": np.bool_(self.normalize),
            "norm_mean": np.float64(self.norm_mean),
            "norm_scale": np.float64(self.norm_scale),
            "norm_box_size": np.int64(self.box_size or self.table.box_size),
            "source": np.str_(self.particles_path or ""),
        }
        if isinstance(self.invert_contrast, bool):
            arrays["invert_contrast"] = np.bool_(self.invert_contrast)

        def write(p: Path) -> None:
            with open(p, "wb") as fh:
                np.savez(fh, **arrays)

        atomic_write(self.split_file, write)

