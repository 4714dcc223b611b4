"""Rank-aware logging: under DDP only global rank 0 writes (no duplicated lines)."""

from __future__ import annotations

import logging


class RankedLogger(logging.LoggerAdapter):
    """A logger that emits on rank 0 only (``rank_zero_only=True``) or prefixes the rank.

    The rank is read when a message is logged (Lightning sets it once processes exist).
    """

    def __init__(self, name: str = __name__, rank_zero_only: bool = True) -> None:
        super().__init__(logging.getLogger(name), {})
        self.rank_zero_only = rank_zero_only

    def log(self, level: int, msg, *args, **kwargs) -> None:
        if not self.isEnabledFor(level):
            return
        from lightning.pytorch.utilities import rank_zero_only

        rank = getattr(rank_zero_only, "rank", 0) or 0
        if self.rank_zero_only and rank != 0:
            return
        if not self.rank_zero_only:
            msg = f"[rank {rank}] {msg}"
        self.logger.log(level, msg, *args, **kwargs)
