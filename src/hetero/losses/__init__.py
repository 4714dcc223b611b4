"""Loss terms and weight schedules.

OPUS-DSD's terms (``conf/loss/opusdsd.yaml``) are ``nn.Module`` objects with a ``weight``
attribute whose ``forward`` returns the *unweighted* value; the model combines them with its
dynamic factors (SNR, beta schedule). The homogeneous model's :class:`ImageMSELoss` returns
its weighted value directly.
"""

from hetero.losses.disentanglement import (
    StructuralDisentanglementPrior,
    interclass_prior,
    intraclass_prior,
    squared_distances,
)
from hetero.losses.kl import KLDivergence, gaussian_kl
from hetero.losses.mse import ImageMSELoss
from hetero.losses.reconstruction import MultiPoseReconstructionLoss, multi_pose_nll, squared_errors
from hetero.losses.schedules import ConstantSchedule, CosineSchedule, SawtoothSchedule
from hetero.losses.snr import RunningSNR, batch_power
from hetero.losses.volume_priors import L1Norm, TotalVariation, l1_norm, total_variation

__all__ = [
    "ConstantSchedule",
    "CosineSchedule",
    "ImageMSELoss",
    "KLDivergence",
    "L1Norm",
    "MultiPoseReconstructionLoss",
    "RunningSNR",
    "SawtoothSchedule",
    "StructuralDisentanglementPrior",
    "TotalVariation",
    "batch_power",
    "gaussian_kl",
    "interclass_prior",
    "intraclass_prior",
    "l1_norm",
    "multi_pose_nll",
    "squared_distances",
    "squared_errors",
    "total_variation",
]
