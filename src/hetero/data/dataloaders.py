"""Datasets and DataLoaders of :class:`~hetero.data.datamodule.ParticleDataModule` (a mixin).

Training batches come from the batch sampler chosen by ``data.sampler``
(:mod:`hetero.data.samplers`, sharded by ``trainer.global_rank`` / ``trainer.world_size``)
through a :class:`~hetero.data.loader.ResumableDataLoader`; validation and prediction batches
are contiguous, in table order. The datasets are lazy: nothing is read into memory.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from hetero.data.dataset import ParticleDataset, collate_particles
from hetero.data.io.errors import InputError
from hetero.data.loader import ResumableDataLoader
from hetero.data.samplers import (
    HealpixBatchSampler,
    RandomBatchSampler,
    SequentialShardBatchSampler,
)

__all__ = ["ParticleLoadersMixin"]


class ParticleLoadersMixin:
    """The datasets and loaders of :class:`~hetero.data.datamodule.ParticleDataModule`,
    which sets the attributes they use (``table``, ``train_indices``, ``norm_scale``, ...)
    in ``setup``."""

    # -- datasets -----------------------------------------------------------------------------
    def _require_setup(self) -> None:
        if self.table is None:
            raise RuntimeError("ParticleDataModule: call setup() first")

    def _dataset(self, indices: np.ndarray | None) -> ParticleDataset:
        return ParticleDataset(
            self.table, box_size=self.box_size, indices=indices,
            invert_contrast=self.invert_contrast, scale=self.norm_scale, mean=self.norm_mean,
            healpix_nside=self.healpix_nside,
        )

    def _build_datasets(self) -> None:
        self.train_dataset = self._dataset(self.train_indices)
        self.val_dataset = self._dataset(self.val_indices)
        self._predict_dataset = None
        self._original_dataset = None

    # -- loaders ------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _loader(self, dataset: ParticleDataset, batch_sampler, resumable: bool = False) -> DataLoader:
        # A private generator: starting an iterator draws its worker seed from it instead of
        # from the global torch RNG, so loaders never shift the models' random streams (a
        # resumed run then continues exactly as an uninterrupted one).
        kwargs = dict(
            batch_sampler=batch_sampler,
            collate_fn=collate_particles,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            generator=torch.Generator().manual_seed(self.sampler_seed),
        )
        if resumable:
            return ResumableDataLoader(dataset, progress=self._train_progress, **kwargs)
        return DataLoader(dataset, **kwargs)

    def _train_progress(self) -> tuple[int, int, int]:
        """``(epoch, training batches done in it, batches per epoch)`` of the attached trainer
        (saved in checkpoints by :class:`~hetero.data.loader.ResumableDataLoader`)."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0, 0
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return int(trainer.current_epoch), int(done), int(trainer.num_training_batches)

    def make_train_batch_sampler(self, rank: int = 0, world_size: int = 1):
        """The training batch sampler for one rank (``data.sampler``, seeded by ``sampler_seed``)."""
        self._require_setup()
        if self.sampler == "healpix":
            return HealpixBatchSampler(
                self.train_dataset.pose_classes, self.batch_size, world_size, rank,
                seed=self.sampler_seed,
            )
        if self.sampler == "sequential":  # exactly once per epoch, no padding (EM models)
            return SequentialShardBatchSampler(len(self.train_dataset), self.batch_size, world_size, rank)
        return RandomBatchSampler(
            len(self.train_dataset), self.batch_size, world_size, rank, seed=self.sampler_seed
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of training particles for this rank (``set_epoch`` via Lightning)."""
        self._require_setup()
        rank, world = self._rank_world()
        if world > 1 and getattr(
            getattr(self.trainer, "_accelerator_connector", None), "use_distributed_sampler", False
        ):
            raise InputError(
                "ParticleDataModule shards batches itself: build the Trainer with "
                "use_distributed_sampler=False"
            )
        return self._loader(
            self.train_dataset, self.make_train_batch_sampler(rank, world), resumable=True
        )

    def val_dataloader(self) -> DataLoader:
        """Validation particles in index order, one contiguous shard per rank."""
        self._require_setup()
        rank, world = self._rank_world()
        sampler = SequentialShardBatchSampler(len(self.val_dataset), self.val_batch_size, world, rank)
        return self._loader(self.val_dataset, sampler)

    @property
    def predict_dataset(self) -> ParticleDataset:
        """All particles in input order (built on first use)."""
        self._require_setup()
        if self._predict_dataset is None:
            self._predict_dataset = self._dataset(None)
        return self._predict_dataset

    @property
    def original_size_dataset(self) -> ParticleDataset:
        """All particles in input order at the *original* box and pixel size (no Fourier crop;
        same normalisation and contrast as training), for reconstructions at full resolution.
        Lazy like every dataset: nothing is read into memory."""
        self._require_setup()
        if self._original_dataset is None:
            self._original_dataset = ParticleDataset(
                self.table, box_size=None, invert_contrast=self.invert_contrast,
                scale=self.norm_scale, mean=self.norm_mean, healpix_nside=self.healpix_nside,
            )
        return self._original_dataset

    def predict_dataloader(
        self, shard: bool | None = None, original_size: bool = False, batches=None
    ) -> DataLoader:
        """ALL particles in input order (``batch["index"]`` = table row), contiguous batches.

        :param shard: split the particles into one contiguous shard per DDP rank. Default:
            only while the attached trainer is running ``trainer.predict`` (Lightning gathers
            per rank); a direct call (e.g. a rank-0 encoding pass after ``fit``) gets all
            particles.
        :param original_size: images at the original box and pixel size
            (:attr:`original_size_dataset`; ``apix``/``origin_px`` follow) instead of the
            training box.
        :param batches: a sequence of index arrays (table rows) to load as batches, in that
            order, instead of the contiguous ones (``shard`` is then ignored: the caller chooses).
        """
        dataset = self.original_size_dataset if original_size else self.predict_dataset
        if batches is not None:
            return self._loader(dataset, [np.asarray(b, dtype=np.int64) for b in batches])
        if shard is None:
            shard = self.trainer is not None and bool(getattr(self.trainer, "predicting", False))
        rank, world = self._rank_world() if shard else (0, 1)
        sampler = SequentialShardBatchSampler(len(dataset), self.val_batch_size, world, rank)
        return self._loader(dataset, sampler)
