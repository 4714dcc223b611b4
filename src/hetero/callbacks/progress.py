"""Progress bar choice: rich in a terminal, a plain periodic bar in batch jobs (SLURM logs)."""

from __future__ import annotations

import sys


def progress_bar(refresh_rate: int = 1):
    """A ``RichProgressBar`` when stdout is a TTY, else a ``TQDMProgressBar`` refreshing rarely
    (so non-interactive logs are not flooded with carriage returns)."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    if sys.stdout.isatty():
        return RichProgressBar(refresh_rate=refresh_rate)
    return TQDMProgressBar(refresh_rate=max(refresh_rate, 50))
