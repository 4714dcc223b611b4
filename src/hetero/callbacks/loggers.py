"""Logger factories that need a decision at run time."""

from __future__ import annotations

import os
from pathlib import Path


def wandb_api_key_available() -> bool:
    """True when wandb can authenticate: ``WANDB_API_KEY`` or a netrc entry for api.wandb.ai."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_logger(offline: bool | None = None, **kwargs):
    """A Lightning ``WandbLogger``; offline unless an API key is configured (or forced).

    ``WANDB_MODE=offline`` in the environment is honoured by wandb itself as well.
    """
    from lightning.pytorch.loggers import WandbLogger

    if offline is None:
        offline = not wandb_api_key_available() or os.environ.get("WANDB_MODE") == "offline"
    Path(kwargs.get("save_dir", ".")).mkdir(parents=True, exist_ok=True)
    return WandbLogger(offline=offline, **kwargs)
