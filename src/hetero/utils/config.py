"""Config helpers: printing, instantiating dicts of objects, checking numeric options, silencing
warnings."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)


def checked_number(value, key: str, *, positive: bool = False, integer: bool = False,
                   unit: str = "", hint: str = "") -> float | int:
    """A numeric option as given: finite, ``>= 0`` (``> 0`` with ``positive``), a whole number
    with ``integer`` (``unit`` names it: ``"of epochs"``); booleans and strings are refused.

    :raises ConfigError: naming ``key``, what it must be (plus ``hint``) and the value given.
    """
    from hetero.utils.errors import ConfigError

    kind = int if integer else int | float
    ok = (not isinstance(value, bool) and isinstance(value, kind) and math.isfinite(value)
          and (value > 0 if positive else value >= 0))
    if not ok:
        what = f"a whole number{' ' + unit if unit else ''}" if integer else "a finite number"
        raise ConfigError(f"{key} must be {what} {'> 0' if positive else '>= 0'}{hint}, got {value!r}")
    return value if integer else float(value)


def instantiate_dict(cfg: DictConfig | None, what: str) -> list:
    """Instantiate every ``_target_`` node of a dict config (``None`` entries are skipped)."""
    import hydra

    objects = []
    if not cfg:
        return objects
    for name, node in cfg.items():
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ValueError(f"{what}.{name} must be a config node with _target_, got {node!r}")
        log.info(f"Instantiating {what} <{node._target_}>")
        objects.append(hydra.utils.instantiate(node))
    return objects


def apply_extras(cfg: DictConfig) -> None:
    """Optional conveniences from ``cfg.extras``: warnings filter and a rich config tree."""
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("print_config"):
        print_config_tree(cfg)


def print_config_tree(
    cfg: DictConfig,
    order: Sequence[str] = ("data", "model", "loss", "schedule", "optim", "trainer", "callbacks", "logger", "paths"),
) -> None:
    """Print the resolved config as a rich tree (rank 0 only)."""
    from lightning.pytorch.utilities import rank_zero_only

    if getattr(rank_zero_only, "rank", 0):
        return
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        branch = tree.add(str(key), style="bold", guide_style="dim")
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
