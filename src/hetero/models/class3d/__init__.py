"""RELION-style 3D classification with fixed poses (``model=class3d``), batched over replicates."""

from hetero.models.class3d.membership import build_membership, leave_one_group_out
from hetero.models.class3d.module import Class3D

__all__ = ["Class3D", "build_membership", "leave_one_group_out"]
