"""The in-memory particle table every reader produces and every dataset consumes.

A :class:`ParticleTable` holds metadata only (poses, shifts, CTF, where each image lives);
pixels stay on disk and are read lazily by :class:`hetero.data.dataset.ParticleDataset`.
All arrays are in *input order* (row ``i`` is the ``i``-th particle of the user's file) and
follow :mod:`hetero.physics.conventions`:

- ``rotations``: ``(N, 3, 3)`` RELION matrices ``A`` (ZYZ Euler rot, tilt, psi).
- ``origins_px``: ``(N, 2)`` RELION origin ``(x, y)`` in pixels *of the original box*; the
  particle centre sits at ``box centre - origin``, and the forward-model translation is
  ``t = -origin``.
- ``ctf``: ``(N, 9)`` in :data:`hetero.physics.ctf.CTF_COLUMNS` order (Å, degrees, kV, mm).
- ``pixel_size_angstrom``: ``(N,)`` per particle (from its optics group).
- ``image_sign``: ``(N,)`` +1/-1 per particle, or ``None`` (all +1): the factor that brings
  the stored pixels to white density (cryoSPARC's ``blob/sign``); the dataset applies it
  before the user's ``invert_contrast``.

The batch contract (what ``ParticleDataset.__getitem__`` returns, collated into ``(B, ...)``):

============== ================= =====================================================
key            shape / dtype     meaning
============== ================= =====================================================
``image``      (D, D) float32    image at the training box ``D`` (Fourier-cropped),
                                 normalised, white density, *not* recentred
``rotation``   (3, 3) float32    RELION ``A``
``origin_px``  (2,) float32      RELION origin in pixels of the training box
``ctf``        (9,) float32      CTF parameters (``CTF_COLUMNS``)
``apix``       () float32        pixel size of the training box (Å)
``index``      () int64          row in the :class:`ParticleTable` (input order)
``half``       () int64          half-set 0 or 1
``pose_class`` () int64          HEALPix projection class of the viewing direction
============== ================= =====================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

BATCH_KEYS = ("image", "rotation", "origin_px", "ctf", "apix", "index", "half", "pose_class")


@dataclass
class ParticleTable:
    """Metadata of ``N`` particles (see module docstring for conventions).

    :param image_paths: ``(N,)`` absolute paths of the stack holding each image (str objects).
    :param image_indices: ``(N,)`` 0-based index of each image within its stack.
    :param box_size: side of the original images (pixels); all particles share it. ``None``
        only for metadata-only reads of a star without ``rlnImageSize`` whose stacks are absent.
    :param pixel_size_angstrom: ``(N,)`` original pixel size (Å/px).
    :param rotations: ``(N, 3, 3)`` float64, or ``None`` when the input has no poses.
    :param origins_px: ``(N, 2)`` float64 RELION origins in original pixels (zeros if absent).
    :param ctf: ``(N, 9)`` float64 CTF table, or ``None`` when the input has no CTF.
    :param half_set: ``(N,)`` int8 in {0, 1}, or ``None`` (``rlnRandomSubset - 1`` when given).
    :param image_sign: ``(N,)`` float in {+1, -1} multiplying the stored pixels (white density),
        or ``None`` for all +1.
    :param optics_group: ``(N,)`` int 1-based RELION optics group (all ones if absent).
    :param optics: the original optics table (pandas DataFrame) when read from a star file.
    :param rows: the original per-particle rows (pandas DataFrame) to write subsets back out.
    :param source: the file the table was read from (for error messages and provenance).
    """

    image_paths: np.ndarray
    image_indices: np.ndarray
    box_size: int | None
    pixel_size_angstrom: np.ndarray
    rotations: np.ndarray | None = None
    origins_px: np.ndarray | None = None
    ctf: np.ndarray | None = None
    half_set: np.ndarray | None = None
    image_sign: np.ndarray | None = None
    optics_group: np.ndarray | None = None
    optics: object | None = None
    rows: object | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.image_indices)
        self.image_paths = np.asarray(self.image_paths, dtype=object)
        self.image_indices = np.asarray(self.image_indices, dtype=np.int64)
        self.pixel_size_angstrom = np.broadcast_to(
            np.asarray(self.pixel_size_angstrom, dtype=np.float64), (n,)
        ).copy()
        if self.origins_px is None:
            self.origins_px = np.zeros((n, 2))
        if self.optics_group is None:
            self.optics_group = np.ones(n, dtype=np.int64)
        if self.image_sign is not None:
            self.image_sign = np.asarray(self.image_sign, dtype=np.float64).reshape(-1)
        names = ("image_paths", "rotations", "origins_px", "ctf", "half_set", "image_sign", "optics_group")
        for name in names:
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(
                    f"{self.source or 'particle table'}: column {name} has {len(value)} rows, "
                    f"expected {n}"
                )

    def __len__(self) -> int:
        return len(self.image_indices)

    def subset(self, indices: np.ndarray) -> ParticleTable:
        """Rows ``indices`` (in that order) as a new table; ``rows`` are subset too."""
        idx = np.asarray(indices, dtype=np.int64)

        def take(a):
            return None if a is None else a[idx]

        rows = self.rows
        if rows is not None:
            rows = rows.iloc[idx].reset_index(drop=True)
        return replace(
            self,
            image_paths=self.image_paths[idx],
            image_indices=self.image_indices[idx],
            pixel_size_angstrom=self.pixel_size_angstrom[idx],
            rotations=take(self.rotations),
            origins_px=take(self.origins_px),
            ctf=take(self.ctf),
            half_set=take(self.half_set),
            image_sign=take(self.image_sign),
            optics_group=take(self.optics_group),
            rows=rows,
            extra=dict(self.extra),
        )

    @property
    def stacks(self) -> list[str]:
        """Distinct stack paths in order of first appearance."""
        seen: dict[str, None] = {}
        for p in self.image_paths:
            seen.setdefault(p, None)
        return list(seen)

    def check_files_exist(self) -> None:
        """Raise :class:`MissingFileError` (a ``FileNotFoundError``) naming the first missing
        stack and how many rows use it."""
        from hetero.data.io.errors import MissingFileError  # the io package imports this module

        for p in self.stacks:
            if not Path(p).exists():
                count = int(np.sum(self.image_paths == p))
                raise MissingFileError(
                    f"{self.source}: image stack {p} (referenced by {count} particles) does not "
                    "exist; pass data.datadir=<folder holding the stacks> if they were moved"
                )
