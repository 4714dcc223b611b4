"""Published datasets (EMPIAR entries) that users download themselves.

A :class:`PublishedDataset` is what ``conf/data/empiar*.yaml`` puts in ``data.particles``: the
data module calls :meth:`PublishedDataset.ensure` before reading anything, so a missing
download fails at once with a message saying what to fetch and where to put it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hetero.data.io.errors import MissingFileError

log = logging.getLogger(__name__)


class PublishedDatasetMissing(MissingFileError):
    """The consensus star file of a published dataset is not where the config expects it."""


class PublishedDataset:
    """A consensus refinement from EMPIAR, located under a user-chosen root folder.

    :param name: e.g. ``"EMPIAR-10180"``.
    :param star: expected path of the consensus ``.star`` (or ``.cs``) file.
    :param url: where to download the entry.
    :param expected_box_size: published box (pixels), checked loosely (warning only).
    :param expected_pixel_size_angstrom: published pixel size (Å), warning only.
    :param expected_n_particles: published particle count, or ``None``.
    """

    def __init__(
        self,
        name: str,
        star: str,
        url: str,
        expected_box_size: int | None = None,
        expected_pixel_size_angstrom: float | None = None,
        expected_n_particles: int | None = None,
    ) -> None:
        self.name = name
        self.star = str(star)
        self.url = url
        self.expected_box_size = expected_box_size
        self.expected_pixel_size_angstrom = expected_pixel_size_angstrom
        self.expected_n_particles = expected_n_particles
        self.truth_dir = None

    def ensure(self) -> str:
        """Path of the consensus file; raises :class:`PublishedDatasetMissing` with instructions."""
        path = Path(self.star)
        if not path.is_file():
            folder = path.parent
            raise PublishedDatasetMissing(
                f"{self.name} is not downloaded: expected its consensus refinement at {path}.\n"
                f"Fetch the particle stacks and the consensus .star from {self.url} and put them "
                f"in {folder}/ (the star file named {path.name}, image names relative to that "
                "folder), or point the config elsewhere with data.root=<folder> or "
                "data.particles.star=<file>."
            )
        return str(path)

    def check(self, box_size: int, pixel_size_angstrom: float, n_particles: int) -> list[str]:
        """Differences from the published numbers (logged as warnings by the data module)."""
        notes = []
        if self.expected_box_size and box_size != self.expected_box_size:
            notes.append(f"box {box_size} px (published {self.expected_box_size})")
        if self.expected_pixel_size_angstrom and abs(pixel_size_angstrom - self.expected_pixel_size_angstrom) > 1e-3:
            notes.append(f"pixel size {pixel_size_angstrom} Å (published {self.expected_pixel_size_angstrom})")
        if self.expected_n_particles and n_particles != self.expected_n_particles:
            notes.append(f"{n_particles} particles (published {self.expected_n_particles})")
        for note in notes:
            log.warning("%s: %s", self.name, note)
        return notes
