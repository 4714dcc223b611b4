"""AlphaCryo4D (Wu et al., IJMS 2022): shuffling, the 3D residual autoencoder, manifold.

The landscape, string method and voting are shared analysis functions
(:mod:`hetero.analysis.landscape`, :mod:`hetero.analysis.string_method`,
:mod:`hetero.analysis.voting`); the pipeline that runs every stage is in
:mod:`hetero.tasks.alphacryo4d`.
"""

from hetero.models.alphacryo4d.autoencoder import ResidualAutoencoder3d, ResidualBlock3d
from hetero.models.alphacryo4d.module import VolumeAutoencoder, extract_features
from hetero.models.alphacryo4d.shuffling import Shuffle, leave_one_out, shuffle_unions

__all__ = [
    "ResidualAutoencoder3d",
    "ResidualBlock3d",
    "Shuffle",
    "VolumeAutoencoder",
    "extract_features",
    "leave_one_out",
    "shuffle_unions",
]
