"""Resume a run directory with its own configuration (``train.py``, before Hydra composes).

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
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from hetero.utils.errors import ConfigError

__all__ = ["RESUME_KEYS", "main_with_resume", "prepare_train_argv", "resume_overrides"]

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
                             conf_dir: str | Path | None = None) -> tuple[list[str], list[str], list[str]]:
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
    new = [f"{k} = {v!r}" for k, v in current.items() if _added_since(k, saved_config)]
    return fixes, notes, new


def _added_since(key: str, saved_config: dict[str, object]) -> bool:
    """``key`` is an option of :data:`RESTORED_KEYS` that the run's config lacks, and so does
    every key above and below it (a value that became a group of options, or a group that
    became a value, is a change, not an addition)."""
    parts = key.split(".")
    below = key + "."
    return (parts[0] in RESTORED_KEYS and not _is_resume_key(key)
            and not any(".".join(parts[:i]) in saved_config for i in range(1, len(parts) + 1))
            and not any(k.startswith(below) for k in saved_config))  # nor a group that became a value


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
        diff = sorted(k for k in changes if saved_config is None or k not in base
                      or not _added_since(k, saved_config))
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
        if (run_dir / STARTED_MARKER).is_file() or (run_dir / "checkpoints").is_dir():
            raise ConfigError(
                f"{run_dir} holds a run but no .hydra/overrides.yaml (it was written with "
                "paths.output_dir, or .hydra/ was removed), so its own configuration cannot be "
                f"restored; its resolved config is {run_dir / STARTED_MARKER}. Start a new run in "
                "another hydra.run.dir with the same overrides.")
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
