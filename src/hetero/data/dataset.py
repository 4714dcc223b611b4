"""The particle dataset shared by every model: lazy pixel reads, Fourier cropping, normalisation.

:class:`ParticleDataset` turns rows of a :class:`~hetero.data.particles.ParticleTable` into
the batch contract of :mod:`hetero.data.particles` (keys :data:`~hetero.data.particles.BATCH_KEYS`).
Only per-particle metadata is held in memory (about 100 bytes per particle, float32/int
arrays); pixels are read from the stacks on demand through a
:class:`~hetero.data.io.mrc.StackCollection` that each process (main or DataLoader worker)
opens lazily for itself, so memory does not grow with the size of the image stacks.

Memory: stacks are memory-mapped (:class:`~hetero.data.io.mrc.ImageStack`). File pages stay
counted in a process' RSS for as long as they are mapped, so a worker that keeps its maps open
shows an RSS that grows towards the size of the stacks it has read, although those pages are
reclaimable page cache (``benchmarks/bench_dataloader.py``, 8 GB of stacks, main process + 2
workers: 12 GB summed RSS with the maps kept open). Job schedulers that police RSS would kill
such a run, so each process closes its maps after every ``unmap_every_bytes`` (256 MiB) of
pixels read: the pages stay in the page cache, re-mapping is cheap, and the mapped file pages
per process stay below that budget whatever the dataset size (2.0 GB summed RSS in the same
benchmark, 1.75 GB for 1 GB of stacks).

Image transform, in this order (``D0`` = original box, ``D`` = training box)::

    x = stack image (D0, D0) float32
    x = fourier_crop_2d(x, D)                 # only when D != D0; keeps the pixel-value scale
    image = sign * (x - mean) * scale         # sign = image_sign * (-1 if invert_contrast else +1)

``image_sign`` is the table's per-particle factor to white density (cryoSPARC ``blob/sign``).
Optics groups with different pixel sizes: each particle is Fourier-resampled to the most
common pixel size instead of the plain crop (:mod:`hetero.data.resample`), so every item has
the same ``apix``; the origin follows.

``mean`` and ``scale`` refer to the (cropped) raw pixel values; :class:`~hetero.data.datamodule.ParticleDataModule`
estimates ``scale = 1 / std`` on a sample of training images and keeps ``mean = 0`` (a shift
would break the CTF/DC image model). Geometry follows the crop: ``apix = apix0 * D0 / D`` and
``origin_px = origin_px0 * D / D0`` (pixels of the training box).

Defaults for tables without some metadata (models must check ``table.rotations is not None`` /
``info()["has_poses"]`` and ``info()["has_ctf"]`` rather than rely on these values):

* no poses: ``rotation`` is the identity and ``pose_class`` is 0;
* no CTF: ``ctf`` is :data:`IDENTITY_CTF_ROW` = ``(0, 0, 0, 300, 0, 1, 0, 0, 1)`` (defocus 0,
  300 kV, Cs 0, amplitude contrast 1, scale 1), which RELION's formula evaluates to exactly
  ``CTF = 1`` at every frequency (an all-zero row would evaluate to NaN: zero voltage);
* no half sets: ``half`` is 0 (the data module assigns random half sets before building
  datasets, so this only applies to datasets built by hand).

Example usage::

    ds = ParticleDataset(table, box_size=64, invert_contrast=False, scale=1 / std)
    item = ds[0]                       # dict of BATCH_KEYS, image (64, 64) float32
    batch = ds.read_batch([0, 5, 7])   # already collated: image (3, 64, 64)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, default_collate

from hetero.data.io.errors import InputError
from hetero.data.io.mrc import StackCollection
from hetero.data.particles import BATCH_KEYS, ParticleTable
from hetero.data.resample import MAX_EDGE_ERROR_PX, resample_images, resample_plan
from hetero.physics.fourier import fourier_crop_2d
from hetero.physics.healpix import healpix_class

__all__ = [
    "IDENTITY_CTF_ROW",
    "ParticleBatch",
    "ParticleBatchItems",
    "ParticleDataset",
    "collate_particles",
    "estimate_normalization",
]

#: Default of ``ParticleDataset(unmap_every_bytes=...)``: 256 MiB.
UNMAP_EVERY_BYTES = 256 * 2**20

#: CTF row (``CTF_COLUMNS`` order) used when the input has no CTF: evaluates to CTF = 1.
IDENTITY_CTF_ROW = (0.0, 0.0, 0.0, 300.0, 0.0, 1.0, 0.0, 0.0, 1.0)


class ParticleDataset(Dataset):
    """Rows ``indices`` of a particle table as batch-contract dicts (see module docstring).

    :param table: the full particle table (not copied; only the selected rows' metadata are
        kept, as compact float32/int arrays).
    :param box_size: training box ``D`` in pixels; ``None`` keeps the original box. Images are
        Fourier-cropped (or zero-padded, if larger) only when ``D`` differs from the original.
    :param indices: ``(n,)`` table rows making up this dataset, in dataset order; ``None`` =
        all rows in input order. ``dataset[i]`` is table row ``indices[i]``.
    :param invert_contrast: multiply images by -1 (for black-density inputs), so outputs are
        white as :mod:`hetero.physics.conventions` requires.
    :param scale: multiplies ``x - mean`` (e.g. ``1 / std`` of the cropped raw pixels).
    :param mean: subtracted from the cropped raw pixels before scaling (keep 0 for CTF models).
    :param healpix_nside: HEALPix resolution of ``pose_class`` (NESTED, ``12 nside^2`` classes).
    :param unmap_every_bytes: close this process' memory maps after this many bytes of pixels
        were read through them (``None``: never). See the module docstring.
    """

    def __init__(
        self,
        table: ParticleTable,
        box_size: int | None = None,
        indices: np.ndarray | None = None,
        invert_contrast: bool = False,
        scale: float = 1.0,
        mean: float = 0.0,
        healpix_nside: int = 2,
        unmap_every_bytes: int | None = UNMAP_EVERY_BYTES,
    ) -> None:
        n_table = len(table)
        if indices is None:
            idx = np.arange(n_table, dtype=np.int64)
        else:
            idx = np.asarray(indices, dtype=np.int64).reshape(-1)
            if idx.size and (idx.min() < 0 or idx.max() >= n_table):
                raise IndexError(
                    f"{table.source or 'particle table'}: dataset indices must lie in "
                    f"[0, {n_table}), got [{idx.min()}, {idx.max()}]"
                )
        self.indices = idx
        self.original_box = int(table.box_size)
        self.box_size = self.original_box if box_size is None else int(box_size)
        if self.box_size < 2:
            raise InputError(f"data.box_size must be >= 2 pixels, got {self.box_size}")
        self.invert_contrast = bool(invert_contrast)
        self.scale = float(scale)
        self.mean = float(mean)
        self.healpix_nside = int(healpix_nside)
        self.source = table.source
        # rows of the user's file when the table is a filtered copy (data.drop_nonfinite)
        self._input_rows = table.extra.get("input_rows") if table.extra else None

        ratio = self.box_size / self.original_box
        codes, uniques = pd.factorize(pd.Series(table.image_paths[idx], dtype=object))
        #: distinct stack paths referenced by this dataset
        self.stack_paths: list[str] = [str(p) for p in uniques]
        self._stack_code = codes.astype(np.int32)
        self._image_index = table.image_indices[idx].astype(np.int64)
        origins = table.origins_px[idx] if table.origins_px is not None else np.zeros((len(idx), 2))
        self._origin = (origins * ratio).astype(np.float32)
        self._apix = (table.pixel_size_angstrom[idx] / ratio).astype(np.float32)
        #: per-item Fourier size when optics groups differ in pixel size (else ``None``)
        self._sizes: np.ndarray | None = None
        plan = resample_plan(table.pixel_size_angstrom, self.original_box, self.box_size)
        if plan.needed:
            if plan.edge_error_px > MAX_EDGE_ERROR_PX:
                raise InputError(
                    f"{table.source or 'particle table'}: optics groups have pixel sizes "
                    f"{sorted(set(np.round(table.pixel_size_angstrom, 4).tolist()))[:6]} Å; "
                    f"resampling them to {plan.apix_train:.4g} Å/px at box {self.box_size} leaves "
                    f"a scale error of {plan.edge_error_px:.2f} px at the box edge (limit "
                    f"{MAX_EDGE_ERROR_PX}); choose another data.box_size or rescale the particles "
                    "to one pixel size (relion_image_handler --rescale_angpix)"
                )
            apix0 = table.pixel_size_angstrom[idx]
            self._sizes = plan.sizes[idx]
            self._origin = (origins * (apix0 / plan.apix_train)[:, None]).astype(np.float32)
            self._apix = np.full(len(idx), plan.apix_train, dtype=np.float32)
        sign = table.image_sign
        self._sign = (
            None if sign is None or bool(np.all(sign[idx] > 0)) else sign[idx].astype(np.float32)
        )
        self.has_poses = table.rotations is not None
        self.has_ctf = table.ctf is not None
        self._rot = table.rotations[idx].astype(np.float32) if self.has_poses else None
        self._ctf = table.ctf[idx].astype(np.float32) if self.has_ctf else None
        half = table.half_set[idx] if table.half_set is not None else np.zeros(len(idx))
        self._half = np.asarray(half, dtype=np.int8)
        #: ``(n,)`` int64 HEALPix class of each item's viewing direction (0 without poses)
        self.pose_classes = (
            healpix_class(table.rotations[idx], self.healpix_nside).astype(np.int64)
            if self.has_poses and len(idx)
            else np.zeros(len(idx), dtype=np.int64)
        )
        self.unmap_every_bytes = None if unmap_every_bytes is None else int(unmap_every_bytes)
        self._stacks: StackCollection | None = None
        self._pid: int | None = None
        self._bytes_mapped = 0

    # -- pickling: never ship open file maps to other processes -------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_stacks"] = None
        state["_pid"] = None
        return state

    def _collection(self) -> StackCollection:
        """This process' stack collection (created on first use, again after a fork)."""
        pid = os.getpid()
        if self._stacks is None or self._pid != pid:
            self._stacks = StackCollection()
            self._pid = pid
        return self._stacks

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def n_classes(self) -> int:
        """Number of HEALPix classes at this ``healpix_nside`` (``12 nside^2``)."""
        return 12 * self.healpix_nside**2

    # -- pixels -------------------------------------------------------------------------------
    def resample(self, images: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        """Geometry only: ``(B, D0, D0)`` raw images of dataset ``positions`` -> ``(B, D, D)`` at
        the training pixel size (Fourier crop, or per-particle resampling across optics groups)."""
        if self._sizes is not None:
            return resample_images(images, self._sizes[np.asarray(positions)], self.box_size)
        if self.box_size != self.original_box:
            return fourier_crop_2d(images, self.box_size).to(torch.float32)
        return images

    def _transform(self, images: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        """``(B, D0, D0)`` raw float32 -> ``(B, D, D)`` cropped, normalised, white images."""
        images = self.resample(images, positions)
        if self._sign is not None:
            images = images * torch.from_numpy(self._sign[np.asarray(positions)])[:, None, None]
        factor = -self.scale if self.invert_contrast else self.scale
        if self.mean != 0.0:
            images = images - self.mean
        if factor != 1.0:
            images = images * factor
        return images.contiguous()

    def read_raw(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """Original-box pixels of dataset ``positions`` as ``(n, D0, D0)`` float32 (a copy).

        Every image read is checked for NaN/inf pixels (one vectorised pass over the batch).

        :raises InputError: an image holds NaN or inf values (see :meth:`nonfinite_message`).
        """
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        stacks = self._collection()
        codes = self._stack_code[pos]
        if len(pos) and (codes == codes[0]).all():  # the common case: one stack per batch
            out = stacks.read_many(self.stack_paths[codes[0]], self._image_index[pos])
        else:
            out = np.empty((len(pos), self.original_box, self.original_box), dtype=np.float32)
            for code in np.unique(codes).tolist():
                rows = np.flatnonzero(codes == code)
                out[rows] = stacks.read_many(self.stack_paths[code], self._image_index[pos[rows]])
        self._bytes_mapped += out.nbytes
        if self.unmap_every_bytes is not None and self._bytes_mapped >= self.unmap_every_bytes:
            stacks.close()  # drop the maps' file pages from this process' RSS
            self._bytes_mapped = 0
        finite = np.isfinite(out).all(axis=(1, 2))
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            raise InputError(self.nonfinite_message(int(pos[bad]), out[bad]))
        return out

    def nonfinite_message(self, position: int, image: np.ndarray | None = None) -> str:
        """What to tell the user about a damaged image at dataset ``position``: the stack, the
        1-based image index (RELION's ``index@stack``), the particle's 1-based row in the input
        (``table.extra["input_rows"]`` maps rows of a filtered table back) and what to do."""
        stack, index = self.stack_location(position)
        row = int(self.indices[position])
        if self._input_rows is not None:
            row = int(self._input_rows[row])
        what = "NaN or inf"
        if image is not None:
            kinds = [k for k, f in (("NaN", np.isnan), ("inf", np.isinf)) if f(image).any()]
            what = " and ".join(kinds) or what
        source = self.source or "the particle file"
        return (
            f"{stack}: image {index + 1} ({index + 1}@{os.path.basename(stack)}, 1-based) holds "
            f"{what} pixel values; it is particle row {row + 1} of {source}. Re-extract the "
            "particle or delete its row; or pass data.drop_nonfinite=true to leave out every "
            "such particle (they are listed in <run dir>/dropped_particles.csv). "
            f"`python -m hetero.data.check {source}` lists all damaged images without training."
        )

    def stack_location(self, position: int) -> tuple[str, int]:
        """``(stack path, 0-based image index in it)`` of dataset ``position``."""
        return self.stack_paths[self._stack_code[position]], int(self._image_index[position])

    # -- items --------------------------------------------------------------------------------
    def _meta(self, pos: np.ndarray) -> dict[str, torch.Tensor]:
        n = len(pos)
        if self._rot is not None:
            rot = torch.from_numpy(self._rot[pos])
        else:
            rot = torch.eye(3, dtype=torch.float32).expand(n, 3, 3).clone()
        if self._ctf is not None:
            ctf = torch.from_numpy(self._ctf[pos])
        else:
            ctf = torch.tensor(IDENTITY_CTF_ROW, dtype=torch.float32).expand(n, 9).clone()
        return {
            "rotation": rot,
            "origin_px": torch.from_numpy(self._origin[pos]),
            "ctf": ctf,
            "apix": torch.from_numpy(self._apix[pos]),
            "index": torch.from_numpy(self.indices[pos]),
            "half": torch.from_numpy(self._half[pos].astype(np.int64)),
            "pose_class": torch.from_numpy(self.pose_classes[pos]),
        }

    def read_batch(self, positions: Sequence[int] | np.ndarray) -> ParticleBatch:
        """Collated batch of dataset ``positions``: the contract with a leading ``(B, ...)``.

        Vectorised: one Fourier crop for the whole batch and one metadata gather.
        """
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if pos.size and (pos.min() < -len(self) or pos.max() >= len(self)):
            raise IndexError(f"dataset positions out of range [0, {len(self)})")
        pos = pos % max(len(self), 1)
        images = self._transform(torch.from_numpy(self.read_raw(pos)), pos)
        batch = {"image": images, **self._meta(pos)}
        return ParticleBatch((k, batch[k]) for k in BATCH_KEYS)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Batch-contract dict of dataset position ``i`` (table row ``indices[i]``)."""
        batch = self.read_batch([int(i)])
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, positions: list[int]) -> ParticleBatchItems:
        """What ``DataLoader`` calls with a batch of positions: one vectorised read.

        Returns a sequence of per-item dicts (so ``default_collate`` or any custom collate
        works) that also carries the already-collated batch, which :func:`collate_particles`
        returns without re-stacking.
        """
        return ParticleBatchItems(self.read_batch(positions))


class ParticleBatch(dict):
    """A collated batch (plain ``dict`` of tensors) that crosses process boundaries cheaply.

    Sending a CPU tensor from a DataLoader worker costs a shared-memory file descriptor each
    (about 0.4 ms); a batch has eight tensors, seven of them tiny. When pickled, this dict
    sends ``image`` through shared memory as usual and the small metadata tensors by value,
    which doubles loader throughput at box 128 (``benchmarks/bench_dataloader.py``). It
    behaves as a ``dict`` everywhere else; tensors not on the CPU pickle normally.
    """

    def __reduce__(self):
        small = {}
        for key, value in self.items():
            if key == "image":
                continue
            if not (isinstance(value, torch.Tensor) and value.device.type == "cpu"):
                return (ParticleBatch, (dict(self),))
            small[key] = value.detach().numpy()
        return (_rebuild_particle_batch, (list(self), self.get("image"), small))

    def __copy__(self) -> ParticleBatch:
        return ParticleBatch(self)


def _rebuild_particle_batch(keys: list[str], image, small: dict[str, np.ndarray]) -> ParticleBatch:
    return ParticleBatch(
        (k, image if k == "image" else torch.from_numpy(small[k])) for k in keys
    )


class ParticleBatchItems(Sequence):
    """A collated batch seen as a sequence of per-item dicts (views, no copies).

    ``items[i]`` is ``{key: batch[key][i]}``; :attr:`collated` is the batch itself.
    """

    def __init__(self, collated: dict[str, torch.Tensor]) -> None:
        self.collated = collated
        self._len = len(collated["index"])

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._len))]
        if not -self._len <= i < self._len:
            raise IndexError(i)
        return {k: v[i] for k, v in self.collated.items()}


def collate_particles(batch):
    """``collate_fn`` for particle loaders: pass a :class:`ParticleBatchItems` through as its
    collated dict (no re-stacking); anything else goes to ``default_collate``."""
    if isinstance(batch, ParticleBatchItems):
        return batch.collated
    return default_collate(batch)


def estimate_normalization(
    dataset: ParticleDataset, n_sample: int = 1000, seed: int = 0, chunk: int = 64
) -> tuple[float, float]:
    """Mean and standard deviation of the *cropped raw* pixels of a random sample of images.

    Uses ``min(n_sample, len(dataset))`` images chosen without replacement with ``seed``,
    transformed at ``dataset.box_size`` with no contrast inversion and no normalisation
    (so the result does not depend on the dataset's own ``mean``/``scale``/``invert``).
    Accumulated in float64, ``chunk`` images at a time (memory ``O(chunk * D0^2)``).

    :return: ``(mean, std)`` of all sampled pixel values.
    :raises InputError: naming the stack and image index of a sampled image with NaN/inf.
    """
    n = min(int(n_sample), len(dataset))
    if n <= 0:
        raise ValueError("cannot estimate normalisation from an empty dataset")
    rng = np.random.default_rng(seed)
    pos = np.sort(rng.choice(len(dataset), size=n, replace=False))
    total = total_sq = 0.0
    count = 0
    for start in range(0, n, chunk):
        chunk_pos = pos[start : start + chunk]
        raw = torch.from_numpy(dataset.read_raw(chunk_pos))
        finite = torch.isfinite(raw).flatten(1).all(1)
        if not bool(finite.all()):
            p = int(chunk_pos[int((~finite).nonzero()[0, 0])])
            stack, image = dataset.stack_location(p)
            raise InputError(
                f"{stack}: image {image} (0-based; particle row {int(dataset.indices[p])} of "
                f"{dataset.source or 'the input'}) contains NaN or inf pixel values; re-extract "
                "or remove it"
            )
        x = dataset.resample(raw, chunk_pos).to(torch.float64)
        total += float(x.sum())
        total_sq += float((x * x).sum())
        count += x.numel()
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    return mean, float(np.sqrt(var))
