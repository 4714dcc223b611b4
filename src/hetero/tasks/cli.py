"""What ``train.py`` and ``analyze.py`` do around their task: print our own errors as a
message, leave no empty run directory behind (resuming a run with its own config is
:mod:`hetero.tasks.resume`).

**Errors.** Input errors (:class:`hetero.data.io.errors.InputError`), the tasks' own
:class:`hetero.utils.errors.HeteroError` and a few more user-facing errors (any exception class
with ``user_error = True`` counts too) are printed as their message alone, written to the run's
log file and end the process with a non-zero status (1, or 2 for a :class:`ConfigError`: a
configuration refused before anything ran, as argparse exits on usage errors); anything else is a bug and keeps its
traceback (a Hydra ``InstantiationException`` is unwrapped to the error it carries). A training
run that fails before training started (input errors, a configuration that cannot work)
removes its run directory, unless it existed before (a resumed run); one that fails while
training keeps it, with the error in its ``train.log``. In a multirun sweep the error is raised on after
printing, so the sweeper records the failed job and goes on (an Optuna trial that diverged).
Ctrl-C ends the process with status 130 and one line, after the task cleaned up (Lightning
stops training gracefully first; an analysis puts the earlier one back).
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
from pathlib import Path

from hetero.tasks.resume import _PREEXISTING_ENV, STARTED_MARKER, _restore_resumed_config
from hetero.utils.errors import HeteroError, user_message

__all__ = ["find_user_error", "is_user_error", "run_task"]

_USER_ERRORS = (
    ("hetero.data.io.errors", "InputError"),
    ("hetero.data.published", "PublishedDatasetMissing"),
    ("hetero.analysis.rundir", "IncompleteRunDirError"),
    ("hetero.analysis.rundir", "DataUnavailableError"),
    ("hetero.analysis.result", "NonFiniteLatentsError"),
    ("hetero.utils.manifest", "ManifestError"),
    ("omegaconf.errors", "MissingMandatoryValue"),  # a required key (`???`) not given
)


# ------------------------------------------------------------------------------ errors
def _is_user_error_class(err: BaseException) -> bool:
    if isinstance(err, HeteroError) or getattr(type(err), "user_error", False):
        return True
    for module, name in _USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is None:
            try:
                cls = getattr(importlib.import_module(module), name, None)
            except ImportError:
                continue
        if isinstance(cls, type) and isinstance(err, cls):
            return True
    return False


def _is_wrapper(err: BaseException) -> bool:
    """Hydra's ``InstantiationException``: an error raised in a constructor built by
    ``hydra.utils.instantiate`` (model, data module, callbacks) arrives wrapped in it."""
    try:
        from hydra.errors import InstantiationException
    except ImportError:  # pragma: no cover - hydra is a dependency
        return False
    return isinstance(err, InstantiationException)


def find_user_error(err: BaseException) -> BaseException | None:
    """``err`` itself, or the error a Hydra ``InstantiationException`` wraps (``__cause__``),
    when it is one whose message is all the user needs; else ``None``."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if _is_user_error_class(err):
            return err
        if not _is_wrapper(err):
            return None
        err = err.__cause__ or err.__context__
    return None


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is one whose message is all the user needs (see module docstring)."""
    return find_user_error(err) is not None


def _log_to_files(message: str) -> None:
    """Write ``message`` to the log files of the root logger only (not the console)."""
    record = logging.LogRecord("hetero", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def run_task(task, cfg, output_dir: str | Path | None = None) -> object:
    """Run ``task(cfg)`` the way the entry points do (see the module docstring).

    :param output_dir: the run directory this task writes (removed when the task fails before
        a checkpoint exists, unless it existed before the run started).
    """
    try:
        return task(cfg)
    except BaseException as err:
        removed = _remove_failed_run_dir(output_dir) if output_dir is not None else None
        if isinstance(err, KeyboardInterrupt) and not _multirun():
            # Ctrl-C: the task has already cleaned up (an analysis put the earlier one back,
            # its log says so); the traceback would only bury that line
            _log_to_files("interrupted by Ctrl-C")
            print("\nInterrupted (Ctrl-C).", file=sys.stderr)
            if removed:
                print(f"(nothing was trained: removed the run directory {removed})", file=sys.stderr)
            sys.exit(130)  # 128 + SIGINT, what shells report for it
        cause = None if isinstance(err, KeyboardInterrupt) else find_user_error(err)
        if cause is None:
            raise
        if isinstance(cause, ValueError):  # a refusal (config or input), not a stop mid-run (Preempted)
            _restore_resumed_config()  # the run's recorded config stays as it was
        message = user_message(cause)
        key = getattr(cause, "full_key", None)
        if type(cause).__name__ == "MissingMandatoryValue" and key:
            message = f"{message.splitlines()[0]}: pass {key}=<value> on the command line"
        _log_to_files(message)
        print(f"\nError: {message}", file=sys.stderr)
        if removed:
            print(f"(nothing was trained: removed the run directory {removed})", file=sys.stderr)
        if _multirun():
            raise  # a sweep records the failed job and goes on (Optuna: a failed trial)
        sys.exit(getattr(cause, "exit_code", 1))


def _multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError, AttributeError):
        return False


def _remove_failed_run_dir(output_dir: str | Path) -> Path | None:
    """Remove a new run's directory when the run failed before training started (no
    ``config_resolved.yaml``, which the training task writes right before fitting, and no
    checkpoint); a run that failed while training keeps its log, config and metrics."""
    path = Path(output_dir)
    preexisting = os.environ.get(_PREEXISTING_ENV)
    if not path.is_dir() or (preexisting and Path(preexisting).resolve() == path.resolve()):
        return None
    if (path / STARTED_MARKER).is_file():
        return None
    if any((path / "checkpoints").glob("*.ckpt")) or any(path.glob("hpc_ckpt_*.ckpt")):
        return None
    shutil.rmtree(path, ignore_errors=True)
    return path
