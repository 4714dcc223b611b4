"""What ``train.py`` and ``analyze.py`` do around their task: resume a run with its own config,
print our own errors as a message, leave no empty run directory behind.

**Resuming a run directory.** ``python train.py hydra.run.dir=<run> ckpt_path=last`` must
continue *that* run, whatever the defaults are today. Before Hydra composes anything,
:func:`prepare_train_argv` reads ``<run>/.hydra/overrides.yaml`` (the run's own command-line
overrides) and runs Hydra with those plus the new ones. New overrides may change only what
does not alter the model or data (:data:`RESUME_KEYS`: ``ckpt_path``, ``trainer.max_epochs``,
loader workers, logging, the non-finite guard...); any other override that would change the
run's configuration is refused, naming it. Options added to hetero since the run was made
(in today's config, not in the run's) take today's defaults, listed when it resumes, and a
resume may set them. Without ``ckpt_path`` an existing run directory is
refused too (it would be overwritten by a new run), except when SLURM requeued the job
(``SLURM_RESTART_COUNT`` > 0): then the run resumes from its last checkpoint by itself. A task
that fingerprints its stages and recomputes only the stale ones (AlphaCryo4D) lists in its
config's ``rerun_keys`` the keys a rerun in its directory may change (``alphacryo4d``: every
stage setting), with or without ``ckpt_path``.

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
import re
import shutil
import sys
from pathlib import Path

from hetero.utils.errors import ConfigError, HeteroError, user_message

__all__ = ["RESUME_KEYS", "find_user_error", "is_user_error", "prepare_train_argv", "run_task", "resume_overrides"]

#: Overrides a resumed run may change (prefix match on the key): they steer the run, not the model.
RESUME_KEYS = (
    "ckpt_path", "trainer.max_epochs", "trainer.max_steps", "trainer.max_time", "trainer.min_epochs",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "predict", "extras", "threads", "tags", "data.num_workers", "data.persistent_workers",
    "data.pin_memory", "data.datadir", "callbacks.progress_bar", "callbacks.nonfinite",
    "callbacks.last_checkpoint.every_n_train_steps", "logger.wandb.offline", "logger.wandb.project",
)
_PREEXISTING_ENV = "HETERO_PREEXISTING_RUN_DIR"
#: written by the training task right before fitting: a run that has it started training
STARTED_MARKER = "config_resolved.yaml"
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


#: the config files of the run being resumed, as they were before Hydra rewrote them
#: (:func:`prepare_train_argv`), put back when the resumed task is refused
_RESUMED_CONFIG: dict[Path, bytes] = {}
_CONFIG_FILES = (".hydra/overrides.yaml", ".hydra/config.yaml", ".hydra/hydra.yaml", STARTED_MARKER)


def _snapshot_config(run_dir: Path) -> None:
    _RESUMED_CONFIG.clear()
    for name in _CONFIG_FILES:
        if (run_dir / name).is_file():
            _RESUMED_CONFIG[run_dir / name] = (run_dir / name).read_bytes()


def _restore_resumed_config() -> None:
    from hetero.utils.files import atomic_write

    for path, data in _RESUMED_CONFIG.items():
        if not path.is_file() or path.read_bytes() != data:
            atomic_write(path, lambda p, data=data: p.write_bytes(data))
    _RESUMED_CONFIG.clear()


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


# ------------------------------------------------------------------------------ resume
def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].strip()


def _is_resume_key(key: str, rerun_keys: tuple[str, ...] = ()) -> bool:
    return any(key == k or key.startswith(k + ".") for k in (*RESUME_KEYS, *rerun_keys))


#: the config folder of a source checkout (train.py passes its own)
CONF_DIR = Path(__file__).resolve().parents[3] / "conf"


def _compose(overrides: list[str], conf_dir: str | Path | None = None):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    conf = str(Path(conf_dir or CONF_DIR).resolve())
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            return compose(config_name="train", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def _flat(cfg) -> dict[str, object]:
    from omegaconf import OmegaConf

    out: dict[str, object] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return out


#: top-level keys whose values define the model and its data: a resume restores the values the
#: run was made with when today's defaults differ (steering keys, RESUME_KEYS, excepted)
RESTORED_KEYS = ("data", "model", "loss", "schedule", "optim", "seed")
_KEY_PART = re.compile(r"^[A-Za-z_][\w\-]*$")


def _override_value(value) -> str:
    """``value`` in Hydra's override grammar (strings quoted; interpolations stay lazy)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_override_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as an override")


def restore_changed_defaults(merged: list[str], saved_config: dict[str, object],
                             conf_dir: str | Path | None = None) -> tuple[list[str], list[str]]:
    """``++key=value`` overrides that give back the run's own values (``saved_config``: its
    ``.hydra/config.yaml``, flattened) where composing ``merged`` today gives other ones:
    defaults that changed since the run was made (e.g. a model's learning rate).

    :return: ``(overrides, notes, new)``; each note names a key with today's and the run's
        value; ``new`` lists ``key = value`` for keys added since the run was made (they take
        today's defaults, and a resume may set them).
    """
    current = _flat(_compose(merged, conf_dir))
    fixes, notes = [], []
    for key, value in saved_config.items():
        if key.split(".")[0] not in RESTORED_KEYS or _is_resume_key(key) or key not in current:
            continue
        if current[key] == value or not all(_KEY_PART.match(p) for p in key.split(".")):
            continue
        fixes.append(f"++{key}={_override_value(value)}")
        notes.append(f"{key}: {current[key]!r} -> {value!r}")
    new = [f"{k} = {v!r}" for k, v in current.items()
           if k.split(".")[0] in RESTORED_KEYS and k not in saved_config and not _is_resume_key(k)]
    return fixes, notes, new


def resume_overrides(saved: list[str], new: list[str], conf_dir: str | Path | None = None,
                     saved_config: dict[str, object] | None = None, rerun_keys: tuple[str, ...] = ()) -> list[str]:
    """The overrides to run a resumed run with: its ``saved`` ones, with the steering keys of
    ``new`` (:data:`RESUME_KEYS` and the run's own ``rerun_keys``) replacing theirs, plus
    :func:`restore_changed_defaults` when ``saved_config`` (the run's ``.hydra/config.yaml``,
    flattened) is given.

    :raises ConfigError: a ``new`` override outside :data:`RESUME_KEYS` would change the
        run's configuration (each such override is named with what it changes).
    """
    steering = [o for o in new if _is_resume_key(_key(o), rerun_keys)]
    others = [o for o in new if not _is_resume_key(_key(o), rerun_keys) and o not in saved]
    keys = {_key(o) for o in steering}
    merged = [o for o in saved if _key(o) not in keys] + steering
    if saved_config is not None:
        restored, notes, added = restore_changed_defaults(merged, saved_config, conf_dir)
        if notes:
            print("Resuming with the run's own values where today's defaults differ:\n  "
                  + "\n  ".join(notes), file=sys.stderr)
        if added:
            print("Options added since this run was made take today's defaults (a resume may "
                  "set them):\n  " + "\n  ".join(added), file=sys.stderr)
        merged += restored
    if not others:
        return merged
    base = _flat(_compose(merged, conf_dir))
    conflicts, allowed = [], []
    for o in others:
        try:
            changed = _flat(_compose([*merged, o], conf_dir))
        except Exception as err:  # noqa: BLE001 - reported to the user as a conflict
            conflicts.append(f"  {o}: {str(err).splitlines()[0]}")
            continue
        changes = [k for k in set(base) | set(changed) if base.get(k, "<absent>") != changed.get(k, "<absent>")]
        # options added since the run was made (in today's config, not in the run's) may be
        # set; anything else must stay as the run had it (restating it is no conflict)
        diff = sorted(k for k in changes if saved_config is None or k in saved_config or k not in base)
        if diff:
            shown = ", ".join(f"{k}: {base.get(k, '<absent>')!r} -> {changed.get(k, '<absent>')!r}" for k in diff[:3])
            conflicts.append(f"  {o}  ({shown}{' ...' if len(diff) > 3 else ''})")
        elif changes:
            allowed.append(o)
    if conflicts:
        raise ConfigError(
            "These overrides would change the configuration of the run being resumed:\n"
            + "\n".join(conflicts)
            + "\nA resumed run keeps its own config (its .hydra/overrides.yaml: "
            + (" ".join(saved) or "none")
            + "). Drop them, or start a new run in another hydra.run.dir. A resume may change "
            "only: " + ", ".join((*RESUME_KEYS, *rerun_keys)) + ", and options added since the run was made"
        )
    return merged + allowed


def prepare_train_argv(argv: list[str], conf_dir: str | Path | None = None) -> list[str]:
    """``train.py``'s command line with a resumed run's own overrides (module docstring).

    :return: the arguments to give Hydra (unchanged unless ``hydra.run.dir`` names a run).
    :raises ConfigError: conflicting overrides, a new run into an existing run directory, or
        ``paths.output_dir`` given (the run directory is ``hydra.run.dir``).
    """
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return argv  # DDP child processes are left alone
    if any(_key(a) == "paths.output_dir" for a in argv):
        raise ConfigError(
            "paths.output_dir follows hydra.run.dir: name the run directory with "
            "hydra.run.dir=<dir> (with -m: hydra.sweep.dir=<dir>) instead. A run written "
            "elsewhere has no .hydra/ beside it, so it could not be resumed with its own "
            "configuration, and a second run there would not be refused.")
    if any(a.startswith("-") for a in argv):
        return argv  # --multirun, --help, --cfg ... are left alone
    hydra_args = [a for a in argv if _key(a).startswith("hydra.")]
    run_dirs = [a.split("=", 1)[1] for a in hydra_args if _key(a) == "hydra.run.dir"]
    if not run_dirs:
        return argv
    run_dir = Path(run_dirs[-1].strip("'\""))
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        return argv
    import yaml

    saved = [str(o) for o in (yaml.safe_load(overrides_file.read_text()) or [])]
    new = [a for a in argv if a not in hydra_args]
    os.environ[_PREEXISTING_ENV] = str(run_dir.resolve())
    _snapshot_config(run_dir)
    config_file = run_dir / ".hydra" / "config.yaml"
    saved_config = None
    if config_file.is_file():
        from omegaconf import OmegaConf

        saved_config = _flat(OmegaConf.load(config_file))
    # a task that fingerprints its stages (AlphaCryo4D) names the keys a rerun may change; its
    # reruns recompute only stale stages, so they need no ckpt_path
    if saved_config is not None and "rerun_keys" in saved_config:
        rerun_keys = tuple(str(k) for k in saved_config["rerun_keys"] or ())
    else:  # a run made before the key existed: what its overrides compose to today
        rerun_keys = tuple(str(k) for k in (_compose(saved, conf_dir).get("rerun_keys") or ()))
    if not rerun_keys and not any(_key(o) == "ckpt_path" for o in new):
        if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
            new.append("ckpt_path=auto")  # a requeued SLURM job resumes by itself
        else:
            raise ConfigError(
                f"{run_dir} already holds a run (overrides: {' '.join(saved) or 'none'}). "
                f"Resume it with `python train.py hydra.run.dir={run_dir} ckpt_path=last`, or "
                "give a new run its own hydra.run.dir (or delete this one)."
            )
    return [*resume_overrides(saved, new, conf_dir, saved_config, rerun_keys), *hydra_args]


def main_with_resume(hydra_main, conf_dir: str | Path | None = None) -> None:
    """Call ``hydra_main()`` (a ``@hydra.main`` function) with :func:`prepare_train_argv`
    applied to ``sys.argv``; a refused resume prints its message and exits with status 2."""
    try:
        sys.argv = [sys.argv[0], *prepare_train_argv(sys.argv[1:], conf_dir)]
    except ConfigError as err:
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    hydra_main()
