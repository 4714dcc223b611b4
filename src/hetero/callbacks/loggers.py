"""Logger factories that need a decision at run time, and loggers that keep a resumed run's history.

* :class:`ResumableCSVLogger`: Lightning's ``CSVLogger`` deletes an existing ``metrics.csv``
  when it starts; this one keeps the rows logged before the checkpoint a run resumes from
  (``resume_step``, set by the training task) and appends after them. Rows the interrupted run
  logged after that checkpoint are dropped: the resumed run logs those steps again.
* :func:`wandb_logger`: offline without an API key; keeps the run id in
  ``<save_dir>/wandb_run_id.txt`` so a resumed run continues the same wandb run
  (``resume="allow"``).
* TensorBoard continues in the same folder by itself; the training task passes
  ``purge_step`` so events logged after the checkpoint are hidden.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    """``ExperimentWriter`` that keeps ``metrics.csv`` rows with ``step < resume_step``."""

    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            keys = list(reader.fieldnames or [])
            rows = list(reader)
        if self._resume_step is not None:
            rows = [r for r in rows if _step(r) < self._resume_step]
        self.metrics_keys = sorted(set(keys))
        tmp = path.with_name(f".{path.name}.partial")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)


def _step(row: dict) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to an existing ``metrics.csv`` (see module docstring).

    :attr resume_step: logger step of the checkpoint being resumed (``None``: keep every row).
    """

    resume_step: int | None = None

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, self.resume_step)
        return self._experiment


def wandb_api_key_available() -> bool:
    """True when wandb can authenticate: ``WANDB_API_KEY`` or a netrc entry for api.wandb.ai."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def _rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def wandb_logger(offline: bool | None = None, **kwargs):
    """A Lightning ``WandbLogger``; offline unless an API key is configured (or forced).

    ``WANDB_MODE=offline`` in the environment is honoured by wandb itself as well. Without an
    explicit ``id`` the run id is kept in ``<save_dir>/wandb_run_id.txt``: a resumed run (same
    run directory) continues the same wandb run.
    """
    from lightning.pytorch.loggers import WandbLogger

    if offline is None:
        offline = not wandb_api_key_available() or os.environ.get("WANDB_MODE") == "offline"
    save_dir = Path(kwargs.get("save_dir", "."))
    save_dir.mkdir(parents=True, exist_ok=True)
    if not kwargs.get("id"):
        id_file = save_dir / "wandb_run_id.txt"
        if id_file.is_file():
            kwargs["id"] = id_file.read_text().strip()
        else:
            import secrets
            import string

            alphabet = string.ascii_lowercase + string.digits  # what wandb's own ids use
            kwargs["id"] = "".join(secrets.choice(alphabet) for _ in range(8))
            if _rank() == 0:
                from hetero.utils.files import write_text

                write_text(id_file, kwargs["id"] + "\n")
    kwargs.setdefault("resume", "allow")
    return WandbLogger(offline=offline, **kwargs)
