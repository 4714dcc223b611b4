"""A LightningDataModule of 3-D volumes (AlphaCryo4D's resampled maps) for the autoencoder.

Volumes come from a ``(V, D, D, D)`` ``.npy`` file (memory-mapped, never loaded whole), a
list of MRC files, or an array. Each volume is preprocessed on its own: optionally
multiplied by a (soft) focus mask, standardised (zero mean, unit variance over its voxels),
then scaled to ``[0, 1]`` by its own minimum and maximum, the range of the autoencoder's
sigmoid output (AlphaCryo4D eq. 1; the reference's loop used the global extrema of a
partly rescaled array, leaving every volume but the first in about ``[0, 0.03]``).

A seeded held-out validation split (``val_fraction``) is made once; the reference validated
on the first volumes, which were also training data.

Batch: ``{"volume": (B, 1, D, D, D) float32, "index": (B,) int64}``.

Example usage::

    dm = VolumeDataModule("resampling/volumes.npy", batch_size=8, val_fraction=0.1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def scale_volume(volume: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Standardise one volume, then scale it to ``[0, 1]`` (float32, same shape).

    A constant volume becomes all zeros.
    """
    x = np.asarray(volume, dtype=np.float64)
    if mask is not None:
        x = x * mask
    std = x.std()
    x = (x - x.mean()) / std if std > 0 else np.zeros_like(x)
    lo, hi = x.min(), x.max()
    x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return x.astype(np.float32)


def standardize_volume(volume: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Z-score of one volume over its voxels (the manifold input, AlphaCryo4D eq. 4)."""
    x = np.asarray(volume, dtype=np.float64)
    if mask is not None:
        x = x * mask
    std = x.std()
    return ((x - x.mean()) / std if std > 0 else np.zeros_like(x)).astype(np.float32)


class VolumeSource:
    """Random access to ``V`` cubic volumes from a ``.npy`` stack, MRC files or an array."""

    def __init__(self, volumes: str | Path | Sequence[str | Path] | np.ndarray) -> None:
        self._paths: list[str] | None = None
        if isinstance(volumes, np.ndarray):
            self._array = volumes
        elif isinstance(volumes, str | Path):
            path = Path(volumes)
            if not path.is_file():
                raise FileNotFoundError(f"volumes: {path} does not exist")
            if path.suffix != ".npy":
                raise ValueError(f"volumes: {path} must be a (V, D, D, D) .npy or a list of .mrc")
            self._array = np.load(path, mmap_mode="r")
        else:
            from hetero.data.io.mrc import read_volume

            self._paths = [str(p) for p in volumes]
            missing = [p for p in self._paths if not Path(p).is_file()]
            if missing:
                raise FileNotFoundError(f"volumes: {len(missing)} map(s) missing, first {missing[0]}")
            first, _ = read_volume(self._paths[0])
            self._array = None
            self._shape = (len(self._paths), *first.shape)
        if self._array is not None:
            self._shape = tuple(self._array.shape)
        if len(self._shape) != 4 or len(set(self._shape[1:])) != 1:
            raise ValueError(f"volumes must be cubic (V, D, D, D); got shape {self._shape}")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self._shape

    @property
    def box_size(self) -> int:
        return int(self._shape[1])

    def __len__(self) -> int:
        return int(self._shape[0])

    def __getitem__(self, i: int) -> np.ndarray:
        if self._paths is not None:
            from hetero.data.io.mrc import read_volume

            vol, _ = read_volume(self._paths[i])
            if vol.shape != self._shape[1:]:
                raise ValueError(f"{self._paths[i]}: shape {vol.shape}, expected {self._shape[1:]}")
            return np.asarray(vol, dtype=np.float32)
        return np.asarray(self._array[i], dtype=np.float32)


class VolumeDataset(Dataset):
    """Scaled volumes ``indices`` of a :class:`VolumeSource`."""

    def __init__(self, source: VolumeSource, indices: np.ndarray, mask: np.ndarray | None = None):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.mask = mask

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = int(self.indices[i])
        vol = scale_volume(self.source[j], self.mask)
        return {"volume": torch.from_numpy(vol)[None], "index": torch.tensor(j)}


class VolumeDataModule(L.LightningDataModule):
    """Volumes for :class:`~hetero.models.alphacryo4d.module.VolumeAutoencoder`.

    :param volumes: ``.npy`` path, list of MRC paths or array ``(V, D, D, D)``.
    :param batch_size: training batch (reference 8); the last partial batch is dropped.
    :param val_fraction: share of volumes held out for validation (at least one).
    :param split_seed: seed of that split.
    :param mask: optional focus mask (MRC path or ``(D, D, D)`` array) applied first.
    :param num_workers: data-loader workers.
    :param indices: use only these volumes of the source (``batch["index"]`` stays the
        source's row); default all.
    """

    def __init__(
        self,
        volumes,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        mask=None,
        num_workers: int = 0,
        indices=None,
    ) -> None:
        super().__init__()
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.volumes = volumes
        self.batch_size = int(batch_size)
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.mask_spec = mask
        self.num_workers = int(num_workers)
        self.source: VolumeSource | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.source is not None:
            return
        self.source = VolumeSource(self.volumes)
        if self.indices is None:
            self.indices = np.arange(len(self.source))
        n = len(self.indices)
        if n < 2:
            raise ValueError(f"volumes: need at least 2 volumes for a validation split, got {n}")
        self.mask = self._load_mask()
        n_val = min(n - 1, max(1, int(round(n * self.val_fraction))))
        order = np.random.default_rng(self.split_seed).permutation(n)
        self.val_indices = np.sort(self.indices[order[:n_val]])
        self.train_indices = np.sort(self.indices[order[n_val:]])

    def _load_mask(self) -> np.ndarray | None:
        if self.mask_spec is None:
            return None
        if isinstance(self.mask_spec, np.ndarray):
            mask = self.mask_spec
        else:
            from hetero.data.io.mrc import read_volume

            mask, _ = read_volume(self.mask_spec)
        mask = np.asarray(mask, dtype=np.float32)
        if mask.shape != self.source.shape[1:]:
            raise ValueError(f"mask shape {mask.shape} does not match the volumes {self.source.shape[1:]}")
        return mask

    def info(self) -> dict:
        self.setup()
        return {
            "n_volumes": len(self.indices),
            "box_size": self.source.box_size,
            "n_train": len(self.train_indices),
            "n_val": len(self.val_indices),
        }

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        data = VolumeDataset(self.source, self.train_indices, self.mask)
        drop = len(data) >= self.batch_size
        rank, world = self._world()
        if world > 1:
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(data, world, rank, shuffle=True, seed=self.split_seed, drop_last=True)
            return DataLoader(data, self.batch_size, sampler=sampler, drop_last=drop, num_workers=self.num_workers)
        return DataLoader(data, self.batch_size, shuffle=True, drop_last=drop, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        data = VolumeDataset(self.source, self.val_indices, self.mask)
        rank, world = self._world()
        if world > 1:
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(data, world, rank, shuffle=False)
            return DataLoader(data, self.batch_size, sampler=sampler, num_workers=self.num_workers)
        return DataLoader(data, self.batch_size, shuffle=False, num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        """Every volume (of ``indices``) in order (not sharded)."""
        self.setup()
        data = VolumeDataset(self.source, self.indices, self.mask)
        return DataLoader(data, self.batch_size, shuffle=False, num_workers=self.num_workers)
