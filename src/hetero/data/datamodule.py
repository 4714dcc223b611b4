"""The LightningDataModule every model trains on: read, validate, split, normalise, batch.

:class:`ParticleDataModule` takes only plain values (Hydra builds it from ``conf/data/*.yaml``).
The training task calls ``dm.prepare_data(); dm.setup("fit"); info = dm.info()`` and builds
the model from ``info``; Lightning calls ``setup`` again later, which is then a no-op.

What ``setup`` does, once:

1. ``particles.ensure()`` when ``particles`` is a dataset spec (synthetic / published), then
   :func:`~hetero.data.io.readers.read_particles` -> :attr:`ParticleDataModule.table`.
2. Poses are required by the ``healpix`` sampler. Every image is checked for NaN/inf pixels
   when it is read (:meth:`ParticleDataset.read_raw`: an :class:`~hetero.data.io.errors.InputError`
   naming the stack, the 1-based image index and the particle row). With
   ``drop_nonfinite=True`` every image is scanned once here instead
   (:func:`hetero.data.check.scan_images`) and the damaged particles are left out of the
   table altogether (so out of training, validation, latents and subsets), each one logged
   and listed in ``dropped_file`` (reused on resume).
3. Half sets: the table's own (``rlnRandomSubset``) when present, else a seeded random 50/50
   split (``half_sets_seed``). Train/validation split: a seeded random ``val_fraction`` of the
   particles (``split_seed``). Both are saved to ``split_file`` (``.npz``) and reused from it
   when it exists (resume, analysis), after checking it matches the particle table.
4. Normalisation: ``scale = 1 / std`` of the raw pixels of up to ``norm_sample_size``
   training images *after* Fourier cropping to ``box_size``; ``mean`` stays 0 (the CTF/DC
   image model needs unshifted images). Saved in the split file and in ``state_dict``.

Steps 3-4 (making, saving and restoring the split state) are
:class:`~hetero.data.splits.SplitStateMixin`; the datasets and loaders are
:class:`~hetero.data.dataloaders.ParticleLoadersMixin`.

DDP: the trainer must use ``use_distributed_sampler=False``; the batch samplers of
:mod:`hetero.data.samplers` shard by ``trainer.global_rank`` / ``trainer.world_size``.

Example usage::

    dm = ParticleDataModule("run_data.star", box_size=128, split_file="out/split.npz")
    dm.prepare_data(); dm.setup("fit")
    model = MyModel(**dm.info())
    trainer.fit(model, datamodule=dm)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from hetero.data.dataloaders import ParticleLoadersMixin
from hetero.data.dataset import ParticleDataset
from hetero.data.io.errors import InputError, MissingFileError
from hetero.data.io.readers import read_particles
from hetero.data.particles import ParticleTable
from hetero.data.resample import resample_plan
from hetero.data.splits import SplitStateMixin, as_numpy
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)

__all__ = ["ParticleDataModule", "SAMPLERS"]

SAMPLERS = ("healpix", "random", "sequential")


class ParticleDataModule(SplitStateMixin, ParticleLoadersMixin, L.LightningDataModule):
    """Particles of one consensus refinement, as training/validation/prediction loaders.

    :param particles: path of a ``.star`` / ``.cs`` / ``.mrcs`` / ``.txt`` input, or an object
        with ``ensure() -> str`` returning such a path (its ``truth_dir`` attribute, if any, is
        exposed as :attr:`truth_dir`; its ``check(box, apix, n)``, if any, is called).
    :param datadir: folder to resolve image names against when the stacks were moved.
    :param poses: cryoDRGN pose pickle (for stack inputs without metadata).
    :param ctf: cryoDRGN CTF pickle (for stack inputs without metadata).
    :param pixel_size_angstrom: pixel size (Å) for stack inputs whose header lacks it.
    :param voltage_kv: acceleration voltage (kV) for a star file without rlnVoltage.
    :param spherical_aberration_mm: Cs (mm) for a star file without rlnSphericalAberration.
    :param amplitude_contrast: for a star file without rlnAmplitudeContrast (RELION 3.0).
    :param pose_shift_units: ``fraction`` (of the box) or ``pixels``: the translations of a
        cryoDRGN pose pickle (``data.poses``).
    :param box_size: training box in pixels (Fourier crop on the fly); ``None`` = original.
    :param invert_contrast: ``True`` flips the sign of black-density inputs, ``False`` keeps it,
        ``"auto"`` measures it on a few hundred particles against their own half-map
        reconstruction (:mod:`hetero.data.contrast`), logs the result, and refuses when it is
        ambiguous; the decision is saved in the split file and the checkpoint.
    :param normalize: scale images to unit standard deviation (estimated on a sample).
    :param norm_sample_size: number of training images the standard deviation is taken on.
    :param val_fraction: fraction of particles held out for validation (seeded).
    :param split_seed: seed of the train/validation split and of the normalisation sample.
    :param split_file: ``.npz`` where the split, half sets and normalisation are saved; reused
        when it exists (must match the particle table).
    :param batch_size: particles per batch and per rank during training.
    :param val_batch_size: batch size of validation/prediction (default ``batch_size``).
    :param num_workers: DataLoader worker processes per loader and rank.
    :param pin_memory: pin host memory of batches (GPU training).
    :param persistent_workers: keep workers alive between epochs (only if ``num_workers > 0``).
    :param sampler: ``"healpix"`` (one projection class per batch; needs poses), ``"random"`` or
        ``"sequential"`` (contiguous unshuffled shards: every particle exactly once per epoch,
        never repeated to pad a DDP rank; for EM models).
    :param healpix_nside: HEALPix resolution of the projection classes (2 -> 48 classes).
    :param sampler_seed: seed of the per-epoch batch shuffles.
    :param half_sets_seed: seed of the random half sets (when the input has none).
    :param root: data root folder; only used by config interpolation, kept for provenance.
    :param drop_nonfinite: scan every image at setup and leave out particles whose image holds
        NaN/inf pixels (default: such an image stops the run when it is read, naming it).
    :param dropped_file: CSV listing the particles left out by ``drop_nonfinite`` (1-based
        rows of the input); written at setup, reused when it exists and matches the input.
    """

    def __init__(
        self,
        particles: Any,
        datadir: str | None = None,
        poses: str | None = None,
        ctf: str | None = None,
        pixel_size_angstrom: float | None = None,
        voltage_kv: float | None = None,
        spherical_aberration_mm: float | None = None,
        amplitude_contrast: float | None = None,
        pose_shift_units: str = "fraction",
        box_size: int | None = None,
        invert_contrast: bool | str = False,
        normalize: bool = True,
        norm_sample_size: int = 1000,
        val_fraction: float = 0.05,
        split_seed: int = 0,
        split_file: str | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        sampler: str = "healpix",
        healpix_nside: int = 2,
        sampler_seed: int = 0,
        half_sets_seed: int = 0,
        root: str | None = None,
        drop_nonfinite: bool = False,
        dropped_file: str | None = None,
    ) -> None:
        super().__init__()
        _check_options(sampler, val_fraction, batch_size)
        self.particles = particles
        self.datadir = datadir
        self.poses = poses
        self.ctf = ctf
        self.pixel_size_angstrom = pixel_size_angstrom
        self.acquisition = {
            "voltage_kv": voltage_kv,
            "spherical_aberration_mm": spherical_aberration_mm,
            "amplitude_contrast": amplitude_contrast,
        }
        self.pose_shift_units = str(pose_shift_units)
        self.box_size = None if box_size is None else int(box_size)
        self.invert_contrast = _contrast_option(invert_contrast)
        #: the :class:`~hetero.data.contrast.ContrastCheck` of ``invert_contrast="auto"``
        self.contrast_check = None
        self.normalize = bool(normalize)
        self.norm_sample_size = int(norm_sample_size)
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.split_file = None if split_file in (None, "") else str(split_file)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size) if val_batch_size else self.batch_size
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.sampler = sampler
        self.healpix_nside = int(healpix_nside)
        self.sampler_seed = int(sampler_seed)
        self.half_sets_seed = int(half_sets_seed)
        self.root = root
        self.drop_nonfinite = bool(drop_nonfinite)
        self.dropped_file = None if dropped_file in (None, "") else str(dropped_file)
        #: particles left out by ``drop_nonfinite`` (0-based rows of the input file)
        self.dropped_rows = np.zeros(0, dtype=np.int64)
        #: ground-truth folder of a synthetic dataset (``None`` for real data)
        self.truth_dir = getattr(particles, "truth_dir", None)
        self._init_setup_state()

    def _init_setup_state(self) -> None:
        """The attributes ``setup`` sets (``None`` / neutral until then)."""
        #: the full particle table (input order), with the half sets in use; set by ``setup``
        self.table: ParticleTable | None = None
        self.particles_path: str | None = None
        self.train_indices: np.ndarray | None = None
        self.val_indices: np.ndarray | None = None
        self.half_sets_source: str | None = None  # "input" | "random"
        self.norm_mean = 0.0
        #: multiplies raw (cropped) pixels: ``1 / std`` when ``normalize`` else 1
        self.norm_scale = 1.0
        self.train_dataset: ParticleDataset | None = None
        self.val_dataset: ParticleDataset | None = None
        self._predict_dataset: ParticleDataset | None = None
        self._original_dataset: ParticleDataset | None = None
        self._pending_state: dict | None = None

    # -- Lightning hooks ----------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Generate / check the input (``particles.ensure()``); reads no pixels."""
        self._resolve_particles()

    def setup(self, stage: str | None = None) -> None:
        """Read the table, split, normalise and build datasets (idempotent: runs once)."""
        if self.table is not None:
            return
        path = self._resolve_particles()
        table = self._read_table(path)
        n = len(table)
        if self.drop_nonfinite:
            table = self._drop_nonfinite(table)
            n = len(table)
        box = self.box_size or table.box_size
        if box > table.box_size:
            log.warning(
                f"data.box_size={box} is larger than the images ({table.box_size} px): images are "
                "zero-padded in Fourier space (no information gained)"
            )
        plan = resample_plan(table.pixel_size_angstrom, table.box_size, box)
        if plan.needed:
            log.info(
                f"{path}: optics groups have pixel sizes "
                f"{sorted(set(np.round(table.pixel_size_angstrom, 4).tolist()))[:6]} Å; every "
                f"image is Fourier-resampled to {plan.apix_train:.4g} Å/px at box {box} (scale "
                f"error at the box edge {plan.edge_error_px:.3f} px)"
            )
        check = getattr(self.particles, "check", None)
        if callable(check):
            check(table.box_size, self._mode(table.pixel_size_angstrom), n)

        saved = self._load_split_file(table)
        if saved is not None:
            train, val, halves, source = saved["train"], saved["val"], saved["halves"], saved["source"]
        else:
            train, val = self._make_split(n)
            halves, source = self._make_half_sets(table)
        self.table = replace(table, half_set=np.asarray(halves, dtype=np.int8))
        self.half_sets_source = source
        self.train_indices, self.val_indices = train, val
        self.particles_path = path

        norm = None
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._apply_state(state)
            norm = (self.norm_mean, self.norm_scale)
        elif saved is not None and saved.get("norm") is not None:
            norm = saved["norm"]
        if norm is None:
            norm = self._estimate_norm()
        self.norm_mean, self.norm_scale = float(norm[0]), float(norm[1])
        if self.invert_contrast == "auto":
            decided = saved.get("invert_contrast") if saved is not None else None
            self.invert_contrast = decided if decided is not None else self._check_contrast(path)
        self._build_datasets()
        self._save_split_file()
        log.info(
            f"{n} particles from {path}: {len(train)} train / {len(val)} val, half sets from "
            f"{source}, box {table.box_size} -> {box} px, norm scale {self.norm_scale:.4g}"
        )

    def _read_table(self, path: str) -> ParticleTable:
        """The particle table of ``path``; refuses a folder, a missing file, an empty selection
        and (``healpix`` sampler) missing poses."""
        if Path(path).is_dir():
            raise InputError(f"data.particles={path} is a folder; pass the particle file in it "
                             "(data.particles=<folder>/run_data.star, a .cs, .mrcs or .txt)")
        try:
            table = read_particles(
                path, datadir=self.datadir, poses=self.poses, ctf=self.ctf,
                pixel_size_angstrom=self.pixel_size_angstrom, pose_shift_units=self.pose_shift_units,
                **self.acquisition,
            )
        except MissingFileError:
            if Path(path).exists():
                raise  # a file it references (stack, poses, ctf) names itself
            raise MissingFileError(f"data.particles={path}: particle file does not exist; "
                                   "pass data.particles=<your .star/.cs/.mrcs/.txt>") from None
        if len(table) == 0:
            raise InputError(f"{path}: the particle selection is empty (0 particles)")
        if self.sampler == "healpix" and table.rotations is None:
            raise InputError(
                f"{path}: no poses (orientations) found, but data.sampler=healpix groups "
                "particles by projection direction; give a consensus refinement with angles "
                "(or data.poses=<cryoDRGN pose pickle>) or use data/sampler=random"
            )
        return table

    def info(self) -> dict[str, Any]:
        """Plain geometry/count values models are built from (valid after ``setup``).

        Keys: ``n_particles, n_train, n_val, original_box, original_apix, box_size, apix,
        has_poses, has_ctf, particles_file``; ``apix = original_apix * original_box / box_size`` (Å/px; the most
        common pixel size when optics groups differ).
        """
        if self.table is None:
            raise RuntimeError("ParticleDataModule.info() needs setup() first")
        original_box = int(self.table.box_size)
        box = int(self.box_size or original_box)
        apix0 = self._mode(self.table.pixel_size_angstrom)
        return {
            "n_particles": len(self.table),
            "n_train": len(self.train_indices),
            "n_val": len(self.val_indices),
            "original_box": original_box,
            "original_apix": apix0,
            "box_size": box,
            "apix": apix0 * original_box / box,
            "has_poses": self.table.rotations is not None,
            "has_ctf": self.table.ctf is not None,
            "particles_file": str(self.particles_path or self.table.source),
        }

    def describe_particles(self, indices, limit: int = 8) -> str:
        """Particles ``indices`` (rows of :attr:`table`, e.g. ``batch["index"]``) as the user
        knows them: 1-based rows of the input file and ``image@stack``."""
        idx = np.asarray(as_numpy(indices), dtype=np.int64).reshape(-1)
        if self.table is None or idx.size == 0:
            return f"particles {idx.tolist()}"
        rows = self.table.extra.get("input_rows")
        parts = []
        for i in idx[:limit].tolist():
            row = int(rows[i]) if rows is not None else i
            stack = Path(str(self.table.image_paths[i])).name
            parts.append(f"{row + 1} ({int(self.table.image_indices[i]) + 1}@{stack})")
        more = f" and {idx.size - limit} more" if idx.size > limit else ""
        return (f"particle rows {', '.join(parts)}{more} of "
                f"{self.particles_path or self.table.source}")

    # -- internals ----------------------------------------------------------------------------
    def _drop_nonfinite(self, table: ParticleTable) -> ParticleTable:
        """``drop_nonfinite``: the table without particles whose image holds NaN/inf."""
        from hetero.data.check import drop_damaged

        filtered, self.dropped_rows = drop_damaged(table, self.dropped_file)
        return filtered

    def _resolve_particles(self) -> str:
        ensure = getattr(self.particles, "ensure", None)
        path = ensure() if callable(ensure) else self.particles
        if path is None or str(path) == "":
            raise InputError("data.particles is not set: give a .star/.cs/.mrcs/.txt path")
        self.truth_dir = getattr(self.particles, "truth_dir", self.truth_dir)
        return str(path)

    @staticmethod
    def _mode(values: np.ndarray) -> float:
        uniq, counts = np.unique(np.asarray(values, dtype=np.float64), return_counts=True)
        return float(uniq[np.argmax(counts)])


def _contrast_option(value: Any) -> bool | str:
    """``data.invert_contrast``: ``True``/``False``/``"auto"`` (YAML or command-line spellings)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("auto", "true", "false"):
        return "auto" if text == "auto" else text == "true"
    raise InputError(f"data.invert_contrast={value!r}; expected true, false or auto")


def _check_options(sampler: str, val_fraction: float, batch_size: int) -> None:
    """Refuse a ``data.sampler``, ``data.val_fraction`` or ``data.batch_size`` out of range."""
    if sampler not in SAMPLERS:
        raise InputError(f"data.sampler must be one of {SAMPLERS}, got {sampler!r}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise InputError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    if int(batch_size) < 1:
        raise InputError(f"data.batch_size must be >= 1, got {batch_size}")
