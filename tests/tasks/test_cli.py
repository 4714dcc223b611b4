"""train.py / analyze.py around their tasks: our errors print as a message, bugs keep their
traceback, failed starts leave no run directory, a resume keeps the run's own config; loggers
that keep a resumed run's history; the machine checks."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hetero.callbacks.loggers import ResumableCSVLogger, wandb_logger
from hetero.tasks.resume import prepare_train_argv, resume_overrides
from hetero.tasks.train import check_machine, resolve_ckpt_path
from hetero.utils.errors import ConfigError
from tests.helpers import compose_train

REPO = Path(__file__).resolve().parents[2]


def cli(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["missing_particles", "bug"])
def test_train_errors_and_no_run_dir_left_behind(tmp_path, case):
    """(trainer=gpu without a GPU takes the same path: test_check_machine.)"""
    args = {"missing_particles": ["data=custom", f"data.particles={tmp_path}/run_data.star"],
            "bug": ["+data.no_such_argument=1"]}[case]
    run_dir = tmp_path / "run"
    result = cli("train.py", *args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert not run_dir.exists(), "a run that failed before training left its directory"
    if case == "bug":  # a real bug keeps its traceback
        assert result.returncode == 1 and "no_such_argument" in result.stderr
        assert "Traceback" in result.stderr or "HYDRA_FULL_ERROR" in result.stderr
        return
    assert "Traceback" not in result.stderr and "CONFIG" not in result.stdout  # no config tree
    last = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(last) == 1
    assert result.returncode == 1 and f"{tmp_path}/run_data.star" in last[0]


def test_analyze_prints_input_errors_as_a_message(tmp_path):
    result = cli("analyze.py", f"run_dir={tmp_path}/nope", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{tmp_path}/nope" in result.stderr


def test_resume_overrides():
    saved = ["model=opusdsd_cpu", "data.box_size=32", "trainer.max_epochs=2", "ckpt_path=last"]
    merged = resume_overrides(saved, ["ckpt_path=last", "trainer.max_epochs=5", "data.box_size=32",
                                      "data.num_workers=0", "callbacks.nonfinite.action=skip"])
    assert merged == ["model=opusdsd_cpu", "data.box_size=32", "ckpt_path=last", "trainer.max_epochs=5",
                      "data.num_workers=0", "callbacks.nonfinite.action=skip"]
    # an override that only restates the run's value is no conflict ...
    assert resume_overrides(saved, ["ckpt_path=last", "model.zdim=8"])[-1] == "ckpt_path=last"
    # ... one that changes it is refused, naming it and what it changes
    with pytest.raises(ConfigError) as err:
        resume_overrides(saved, ["ckpt_path=last", "model.zdim=4", "optim=adamw"])
    message = str(err.value)
    assert "model.zdim=4  (model.zdim: 8 -> 4)" in message and "optim=adamw" in message
    assert "model=opusdsd_cpu" in message  # the run's own overrides are shown


def test_prepare_train_argv(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("HETERO_PREEXISTING_RUN_DIR", raising=False)
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- model=opusdsd_cpu\n- data.box_size=32\n")
    argv = [f"hydra.run.dir={run}", "ckpt_path=last"]
    assert prepare_train_argv(argv) == ["model=opusdsd_cpu", "data.box_size=32", "ckpt_path=last",
                                        f"hydra.run.dir={run}"]
    assert os.environ["HETERO_PREEXISTING_RUN_DIR"] == str(run.resolve())
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare_train_argv([f"hydra.run.dir={run}", "model=opusdsd_cpu"])
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeued SLURM job resumes by itself
    assert prepare_train_argv([f"hydra.run.dir={run}"])[2] == "ckpt_path=auto"
    fresh = [f"hydra.run.dir={tmp_path}/new", "model=homogeneous"]
    assert prepare_train_argv(fresh) == fresh
    # the run directory is named by hydra.run.dir only: one elsewhere could not be resumed
    for elsewhere in (["paths.output_dir=/tmp/x"], ["-m", "paths.output_dir=/tmp/x", "seed=1,2"]):
        with pytest.raises(ConfigError, match="name the run directory with hydra.run.dir"):
            prepare_train_argv(elsewhere)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP child process: left alone
    assert prepare_train_argv(argv) == argv


def test_a_run_with_rerun_keys_reruns_with_them_changed(tmp_path, monkeypatch):
    """model=alphacryo4d fingerprints its stages: a rerun in its directory may change any
    alphacryo4d.* key, without ckpt_path; other keys are still refused."""
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("HETERO_PREEXISTING_RUN_DIR", raising=False)
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- model=alphacryo4d\n- alphacryo4d.path.k=8\n")
    argv = [f"hydra.run.dir={run}", "alphacryo4d.path.k=3", "alphacryo4d.landscape.energy=density"]
    assert prepare_train_argv(argv) == ["model=alphacryo4d", "alphacryo4d.path.k=3",
                                        "alphacryo4d.landscape.energy=density", f"hydra.run.dir={run}"]
    with pytest.raises(ConfigError, match="data.box_size=48"):
        prepare_train_argv([f"hydra.run.dir={run}", "data.box_size=48"])
    (run / ".hydra" / "config.yaml").write_text("rerun_keys: []\n")  # the run's own config decides
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare_train_argv(argv)


def test_a_refused_rerun_leaves_the_runs_config_as_it_was(tmp_path, monkeypatch):
    """Hydra rewrites .hydra/overrides.yaml before the task can refuse a value; the refusal puts
    the run's own files back, so the next plain rerun is not stuck with the bad value."""
    from hetero.tasks.cli import run_task

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("HETERO_PREEXISTING_RUN_DIR", raising=False)
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    saved = "- model=alphacryo4d\n"
    (run / ".hydra" / "overrides.yaml").write_text(saved)
    prepare_train_argv([f"hydra.run.dir={run}", "alphacryo4d.landscape.bandwidth=0.5"])
    (run / ".hydra" / "overrides.yaml").write_text(saved + "- alphacryo4d.landscape.bandwidth=0.5\n")  # Hydra's

    def refused(cfg):
        raise ConfigError("alphacryo4d.landscape.bandwidth=0.5 applies to landscape.energy=density only")

    with pytest.raises(SystemExit):
        run_task(refused, None, output_dir=run)
    assert (run / ".hydra" / "overrides.yaml").read_text() == saved


def test_resolve_ckpt_path(tmp_path):
    assert resolve_ckpt_path(None, tmp_path) is None and resolve_ckpt_path("auto", tmp_path) is None
    with pytest.raises(ConfigError, match="hydra.run.dir=<run dir> ckpt_path=last"):
        resolve_ckpt_path("last", tmp_path)
    (tmp_path / "checkpoints").mkdir()
    last, hpc = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    last.write_bytes(b"x")
    hpc.write_bytes(b"x")
    os.utime(last, (1, 1))
    assert resolve_ckpt_path("auto", tmp_path) == str(hpc)  # the newer one
    assert resolve_ckpt_path("last", tmp_path) == str(last)


def test_check_machine(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="trainer=cpu"):
        check_machine(compose_train(tmp_path, ["trainer=ddp"]))
    with caplog.at_level(logging.WARNING):
        n = check_machine(compose_train(tmp_path, ["trainer.devices=64"]))
    assert n == 64 and "trainer.devices=64 on CPU starts 64 training processes" in caplog.text


def test_csv_logger_keeps_history_before_the_resumed_step(tmp_path):
    folder = tmp_path / "logs" / "csv"
    folder.mkdir(parents=True)
    with open(folder / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["epoch", "step", "train/loss"])
        w.writerows([[s // 10, s, 1.0 / (s + 1)] for s in range(15)])  # killed at step 14
    logger = ResumableCSVLogger(save_dir=tmp_path / "logs", name="csv", version="")
    logger.resume_step = 10  # the checkpoint was taken after 10 steps
    logger.log_metrics({"train/loss": 0.5, "val/loss": 0.25}, step=10)
    logger.save()
    with open(folder / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(float(r["step"])) for r in rows] == list(range(11))
    assert rows[3]["train/loss"] == str(1.0 / 4) and rows[-1]["val/loss"] == "0.25"


def test_wandb_logger_keeps_its_run_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    first = wandb_logger(save_dir=str(tmp_path), project="hetero", name="train")
    again = wandb_logger(save_dir=str(tmp_path), project="hetero", name="train")
    run_id = (tmp_path / "wandb_run_id.txt").read_text().strip()
    assert first._wandb_init["id"] == again._wandb_init["id"] == run_id and len(run_id) == 8
    assert again._wandb_init["resume"] == "allow"


def test_tensorboard_hides_events_logged_after_the_resumed_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from hetero.tasks.train import _loggers

    cfg = compose_train(tmp_path, ["logger=many", "logger.wandb=null"])
    loggers = {type(lg).__name__: lg for lg in _loggers(cfg, resume_step=27)}
    assert loggers["TensorBoardLogger"]._kwargs["purge_step"] == 27
    assert loggers["ResumableCSVLogger"].resume_step == 27
    fresh = {type(lg).__name__: lg for lg in _loggers(cfg, resume_step=None)}
    assert "purge_step" not in fresh["TensorBoardLogger"]._kwargs


def test_resume_restores_values_whose_defaults_changed_since_the_run(tmp_path, monkeypatch, capsys):
    """A run made when model=opusdsd meant the paper's settings keeps them when resumed."""
    from omegaconf import OmegaConf

    from hetero.tasks.resume import _compose, _flat

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    then = ["model=opusdsd_cpu", "loss.tv.normalization=paper", "data.batch_size=32",
            "optim.optimizer.lr=1e-4", "trainer.max_epochs=3"]
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(_compose(then)))
    (run / ".hydra" / "overrides.yaml").write_text("- model=opusdsd_cpu\n- trainer.max_epochs=3\n")
    argv = prepare_train_argv([f"hydra.run.dir={run}", "ckpt_path=last", "trainer.max_epochs=5",
                               "data.batch_size=32"])  # restating the run's own value is fine
    assert "data.batch_size: 16 -> 32" in capsys.readouterr().err
    again = _flat(_compose([a for a in argv if not a.startswith("hydra.")]))
    saved = _flat(_compose(then))
    assert sorted(k for k in saved if saved[k] != again.get(k)) == ["ckpt_path", "trainer.max_epochs"]
    assert again["trainer.max_epochs"] == 5
    with pytest.raises(ConfigError, match=r"data.batch_size=8  \(data.batch_size: 32 -> 8\)"):
        prepare_train_argv([f"hydra.run.dir={run}", "ckpt_path=last", "data.batch_size=8"])


def test_resume_names_options_added_since_the_run_and_lets_them_be_set(tmp_path, monkeypatch, capsys):
    """A run made before model.encoder_logstd_max existed (trained unbounded) is told that the
    option now defaults to 2.0 and may set it back to null; its other keys stay locked."""
    from omegaconf import OmegaConf, open_dict

    from hetero.tasks.resume import _compose, _flat

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    then = _compose(["model=opusdsd_cpu"])
    with open_dict(then):
        del then.model["encoder_logstd_max"]
        del then.trainer["gradient_clip_val"]
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(then))
    (run / ".hydra" / "overrides.yaml").write_text("- model=opusdsd_cpu\n")
    prepare_train_argv([f"hydra.run.dir={run}", "ckpt_path=last"])
    assert "model.encoder_logstd_max = 2.0" in capsys.readouterr().err
    argv = prepare_train_argv([f"hydra.run.dir={run}", "ckpt_path=last", "model.encoder_logstd_max=null"])
    assert _flat(_compose([a for a in argv if not a.startswith("hydra.")]))["model.encoder_logstd_max"] is None
    with pytest.raises(ConfigError, match="model.zdim"):
        prepare_train_argv([f"hydra.run.dir={run}", "ckpt_path=last", "model.zdim=4"])
    with pytest.raises(ConfigError, match="model.not_an_option"):  # a key no config has
        prepare_train_argv([f"hydra.run.dir={run}", "ckpt_path=last", "+model.not_an_option=1"])
    from hetero.tasks.resume import _added_since  # a value that became a group is not "added"
    assert not _added_since("optim.scheduler.gamma", {"optim.scheduler": None})
    assert not _added_since("optim.scheduler", {"optim.scheduler.gamma": 0.1})
    assert _added_since("model.encoder_logstd_max", {"model.zdim": 8})
    # only model/data/loss/... options are listed and may be set, not trainer ones
    with pytest.raises(ConfigError, match="trainer.gradient_clip_val"):
        prepare_train_argv([f"hydra.run.dir={run}", "ckpt_path=last", "trainer.gradient_clip_val=100"])


def test_a_run_directory_without_its_hydra_overrides_is_refused(tmp_path, monkeypatch):
    """A run written with paths.output_dir (no .hydra/ beside it) cannot be resumed with its own
    configuration: refused rather than resumed with today's defaults."""
    monkeypatch.delenv("HETERO_PREEXISTING_RUN_DIR", raising=False)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds a run but no .hydra/overrides.yaml"):
        prepare_train_argv([f"hydra.run.dir={run}", "ckpt_path=last"])


def test_an_input_error_inside_hydra_instantiate_prints_as_its_message(tmp_path, capsys, monkeypatch):
    from hydra.errors import InstantiationException

    from hetero.data.io.errors import InputError
    from hetero.tasks.cli import run_task

    monkeypatch.delenv("HETERO_PREEXISTING_RUN_DIR", raising=False)

    def task(cfg):
        try:
            raise InputError("/data/run_data.star, line 12: 9 values for 10 columns")
        except InputError as err:
            raise InstantiationException("Error in call to target 'X':\nInputError(...)") from err

    run_dir = tmp_path / "new"
    run_dir.mkdir()
    with pytest.raises(SystemExit) as exit_:
        run_task(task, None, output_dir=run_dir)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Error in call" not in err and "Traceback" not in err
    assert "Error: /data/run_data.star, line 12: 9 values for 10 columns" in err
    assert not run_dir.exists()  # failed before training started

    def bug(cfg):
        raise InstantiationException("Error in call to target 'X'") from KeyError("x")

    started = tmp_path / "started"
    started.mkdir()
    (started / "config_resolved.yaml").write_text("{}\n")  # training had started
    with pytest.raises(InstantiationException):
        run_task(bug, None, output_dir=started)
    assert started.is_dir()


def test_a_missing_required_value_prints_what_to_pass(tmp_path, capsys, monkeypatch):
    """``data=custom`` without ``data.particles``: one message naming the key, no traceback."""
    from omegaconf import OmegaConf

    from hetero.tasks.cli import run_task

    monkeypatch.delenv("HETERO_PREEXISTING_RUN_DIR", raising=False)
    cfg = OmegaConf.create({"data": {"particles": "???"}})

    def task(cfg):
        return cfg.data.particles

    run_dir = tmp_path / "new"
    run_dir.mkdir()
    with pytest.raises(SystemExit) as exit_:
        run_task(task, cfg, output_dir=run_dir)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err
    assert "Missing mandatory value: data.particles: pass data.particles=<value>" in err


def test_ctrl_c_ends_with_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    """Ctrl-C during a task: no traceback, the shell's status for SIGINT; a sweep sees the error."""
    import hetero.tasks.cli as cli

    monkeypatch.delenv("HETERO_PREEXISTING_RUN_DIR", raising=False)

    def task(cfg):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_:
        cli.run_task(task, None)
    err = capsys.readouterr().err
    assert exit_.value.code == 130 and "Traceback" not in err and "Interrupted (Ctrl-C)" in err
    monkeypatch.setattr(cli, "_multirun", lambda: True)
    with pytest.raises(KeyboardInterrupt):
        cli.run_task(task, None)


def test_ctrl_c_during_fit_is_a_keyboard_interrupt_again():
    """Lightning ends fit after Ctrl-C with ``sys.exit(1)``; _fit turns that back into a
    KeyboardInterrupt (status 130 at the entry point); other exits pass through."""
    from types import SimpleNamespace

    from hetero.tasks.train import _fit

    def trainer(code, interrupted):
        def fit(*args, **kwargs):
            raise SystemExit(code)

        return SimpleNamespace(fit=fit, interrupted=interrupted)

    with pytest.raises(KeyboardInterrupt):
        _fit(trainer(1, True), None, None, None)
    for code, interrupted in ((1, False), (2, True)):
        with pytest.raises(SystemExit) as exit_:
            _fit(trainer(code, interrupted), None, None, None)
        assert exit_.value.code == code


def test_a_checkpoint_that_does_not_fit_the_model_is_a_config_error():
    """ckpt_path=<another configuration's checkpoint>: torch's size-mismatch RuntimeError
    becomes one message naming the checkpoint and what to do; other errors pass through."""
    from types import SimpleNamespace

    from hetero.tasks.train import _fit

    def failing(error):
        def fit(*args, **kwargs):
            raise error
        return SimpleNamespace(fit=fit, interrupted=False)

    try:
        torch.nn.Linear(4, 2).load_state_dict(torch.nn.Linear(3, 2).state_dict())
    except RuntimeError as err:
        mismatch = err
    with pytest.raises(ConfigError, match=r"ckpt_path=old.ckpt does not fit this model \(size mismatch for weight"):
        _fit(failing(mismatch), None, None, "old.ckpt")
    with pytest.raises(RuntimeError, match="other"):
        _fit(failing(RuntimeError("other")), None, None, "old.ckpt")
    own = failing(mismatch)
    own.default_root_dir = "run"
    with pytest.raises(ConfigError, match="it is this run's own checkpoint"):
        _fit(own, None, None, "run/checkpoints/last.ckpt")
