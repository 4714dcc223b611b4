"""OPUS-DSD (``model=opusdsd``): 3-D convolutional VAE with a structural disentanglement prior."""

from hetero.models.opusdsd.decoder import VolumeDecoder
from hetero.models.opusdsd.encoder import ImageEncoder
from hetero.models.opusdsd.memory_bank import MemoryBank
from hetero.models.opusdsd.module import OpusDSD
from hetero.models.opusdsd.poses import neighbour_rotations

__all__ = ["ImageEncoder", "MemoryBank", "OpusDSD", "VolumeDecoder", "neighbour_rotations"]
