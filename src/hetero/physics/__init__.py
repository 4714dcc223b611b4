"""Pure tensor functions for cryo-EM image formation, following RELION's conventions.

No Lightning, no file I/O. See :mod:`hetero.physics.conventions` for the contract every
other module relies on (Euler angles, origins, CTF sign, array order, units).
"""

from hetero.physics.ctf import CTF_COLUMNS, CTFParams, compute_ctf, ctf_table_compute
from hetero.physics.fourier import (
    fft2_centered,
    fft3_centered,
    fourier_crop_2d,
    fourier_crop_3d,
    ifft2_centered,
    ifft3_centered,
    radial_average,
    randomise_phases_beyond,
    shift_images,
)
from hetero.physics.fsc import (
    fsc,
    fsc_auc,
    fsc_corrected,
    fsc_crossing,
    fsc_resolution,
    randomise_from_shell,
    shell_resolution_angstrom,
)
from hetero.physics.healpix import healpix_class, n_healpix_classes
from hetero.physics.masks import circular_mask, soft_mask_from_volume, spherical_mask
from hetero.physics.projection import project_fourier, project_real, render, rotate_volume
from hetero.physics.reconstruction import BackprojectionAccumulator, backproject
from hetero.physics.rotations import (
    euler_to_matrix,
    geodesic_distance_deg,
    matrix_to_euler,
    matrix_to_quaternion,
    quaternion_to_matrix,
    random_rotations,
    viewing_direction,
)

__all__ = [
    "CTF_COLUMNS", "CTFParams", "compute_ctf", "ctf_table_compute",
    "fft2_centered", "fft3_centered", "fourier_crop_2d", "fourier_crop_3d", "ifft2_centered",
    "ifft3_centered", "radial_average", "randomise_phases_beyond", "shift_images",
    "fsc", "fsc_auc", "fsc_corrected", "fsc_crossing", "fsc_resolution", "randomise_from_shell",
    "shell_resolution_angstrom",
    "healpix_class", "n_healpix_classes",
    "circular_mask", "soft_mask_from_volume", "spherical_mask",
    "project_fourier", "project_real", "render", "rotate_volume",
    "BackprojectionAccumulator", "backproject",
    "euler_to_matrix", "geodesic_distance_deg", "matrix_to_euler", "matrix_to_quaternion",
    "quaternion_to_matrix", "random_rotations", "viewing_direction",
]
