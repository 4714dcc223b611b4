"""Particle file readers and writers (RELION, cryoSPARC, cryoDRGN, MRC).

Everything is converted to RELION's conventions (:mod:`hetero.physics.conventions`) into a
:class:`hetero.data.particles.ParticleTable`. Bad user input raises :class:`InputError`
(a ``ValueError``) naming the file and what was expected.

Example usage::

    from hetero.data.io import read_particles, validate_pixels, write_star

    table = read_particles("run_data.star", datadir="/data/Extract")
    validate_pixels(table, n_sample=64)
    write_star("subset.star", table, indices=[0, 5, 9])
"""

from hetero.data.io.cryodrgn import (
    RestrictedUnpickler,
    read_cryodrgn_ctf,
    read_cryodrgn_poses,
    safe_load_pickle,
)
from hetero.data.io.cryosparc import read_cs
from hetero.data.io.errors import InputError, MissingFileError, StackIndexError
from hetero.data.io.mrc import (
    ImageStack,
    StackCollection,
    read_header,
    read_volume,
    write_stack,
    write_volume,
)
from hetero.data.io.readers import check_stacks, read_particles, validate_pixels
from hetero.data.io.star import read_star, write_star

__all__ = [
    "ImageStack",
    "InputError",
    "MissingFileError",
    "RestrictedUnpickler",
    "StackCollection",
    "StackIndexError",
    "check_stacks",
    "read_cryodrgn_ctf",
    "read_cryodrgn_poses",
    "read_cs",
    "read_header",
    "read_particles",
    "read_star",
    "read_volume",
    "safe_load_pickle",
    "validate_pixels",
    "write_stack",
    "write_star",
    "write_volume",
]
