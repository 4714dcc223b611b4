"""Interrupted runs resume exactly: SIGKILL mid-epoch, SIGTERM, a resume with the run's own config.

Every run here goes through the real ``train.py`` in a subprocess (tiny OPUS-DSD, 144 training
particles, 9 batches per epoch, 2 epochs, one thread): an uninterrupted reference run, a run
killed with SIGKILL in the middle of its second epoch and one stopped by SIGTERM there, each
resumed with nothing but ``hydra.run.dir=<run> ckpt_path=last``. The resumed runs must end with
bit-identical weights (the models draw random numbers every step, so the random generators,
the batch order and the position in the epoch must all be restored).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 9
RUN = [
    "trainer=cpu", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false", "callbacks.progress_bar=null", "predict=false", "threads=1",
    "data/sampler=random", "data.particles.n_particles=160", "data.particles.box_size=32",
    "data.particles.pixel_size_angstrom=5.0", "data.particles.n_states=2", "data.particles.snr=1.0",
    "data.box_size=24", "data.batch_size=16", "data.num_workers=0", "data.persistent_workers=false",
    "data.norm_sample_size=100", "data.val_fraction=0.1",
    "model=opusdsd", "model.template_size=16", "model.encoder_channels=[4,8,8]",
    "model.decoder_channels=[16,8,8,4]", "model.fc_width=32", "model.decoder_fc_width=32",
]


def train_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def signal_at(run_dir: Path, step: int, sig: str) -> str:
    return (f"++callbacks.interrupt={{_target_:tests.tasks.signals.SignalAt,step:{step},"
            f"marker:{run_dir}/signal_sent,signal:{sig}}}")


def ckpt(run_dir: Path, name: str = "last") -> dict:
    return torch.load(run_dir / "checkpoints" / f"{name}.ckpt", map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differ = [k for k, v in a["state_dict"].items() if not torch.equal(v, b["state_dict"][k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def metrics_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "logs" / "csv" / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    root = tmp_path_factory.mktemp("resume")
    run_dir = root / "reference"
    result = train_cli(*RUN, f"hydra.run.dir={run_dir}", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_sigkill_mid_epoch_resumes_from_the_last_epoch_and_ends_identical(reference, tmp_path):
    run_dir = tmp_path / "killed"
    killed = train_cli(*RUN, f"hydra.run.dir={run_dir}", signal_at(run_dir, STEPS_PER_EPOCH + 3, "SIGKILL"),
                       cwd=tmp_path)
    assert killed.returncode == -9
    # last.ckpt is the end of the first epoch (the only completed one), not a stale older one
    saved = ckpt(run_dir)
    assert (saved["epoch"], saved["global_step"]) == (0, STEPS_PER_EPOCH)
    config_before = (run_dir / "config_resolved.yaml").read_text()

    resumed = train_cli(f"hydra.run.dir={run_dir}", "ckpt_path=last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ckpt(run_dir)["global_step"] == 2 * STEPS_PER_EPOCH
    assert_same_weights(ckpt(reference), ckpt(run_dir))
    # the run's own config was restored: only ckpt_path differs
    changed = set(config_before.splitlines()) ^ set((run_dir / "config_resolved.yaml").read_text().splitlines())
    assert changed == {"ckpt_path: null", "ckpt_path: last"}
    # the CSV history is kept and continues: the same training losses at the same steps
    ref = {(r["step"], r["train/loss"]) for r in metrics_rows(reference) if r.get("train/loss")}
    got = [(r["step"], r["train/loss"]) for r in metrics_rows(run_dir) if r.get("train/loss")]
    assert len(got) == len(set(got)) and set(got) == ref


def test_sigterm_saves_a_resumable_checkpoint_and_exits_nonzero(reference, tmp_path):
    run_dir = tmp_path / "terminated"
    step = STEPS_PER_EPOCH + 3
    stopped = train_cli(*RUN, f"hydra.run.dir={run_dir}", signal_at(run_dir, step, "SIGTERM"), cwd=tmp_path)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "ckpt_path=last" in stopped.stderr and "Traceback" not in stopped.stderr
    assert not (run_dir / "train_metrics.json").exists()
    assert ckpt(run_dir)["global_step"] == step  # saved where it stopped, mid-epoch

    resumed = train_cli(f"hydra.run.dir={run_dir}", "ckpt_path=last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(ckpt(reference), ckpt(run_dir))


def test_resume_refuses_overrides_that_change_the_run(reference, tmp_path):
    before = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    result = train_cli(f"hydra.run.dir={reference}", "ckpt_path=last", "model=homogeneous",
                       "data.box_size=16", "trainer.max_epochs=3", cwd=tmp_path)
    assert result.returncode == 2
    assert "model=homogeneous" in result.stderr and "data.box_size=16" in result.stderr
    assert "trainer.max_epochs" not in result.stderr.split("would change")[1].split("A resumed")[0]
    assert "Traceback" not in result.stderr
    # nothing in the run directory was touched
    assert {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()} == before

    fresh = train_cli(*RUN, f"hydra.run.dir={reference}", cwd=tmp_path)  # a new run into it
    assert fresh.returncode == 2 and "ckpt_path=last" in fresh.stderr
    assert {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()} == before


def test_an_error_in_a_resumed_run_goes_to_its_log_and_keeps_the_run(reference, tmp_path):
    result = train_cli(f"hydra.run.dir={reference}", f"ckpt_path={tmp_path}/gone.ckpt", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = f"ckpt_path={tmp_path}/gone.ckpt: no checkpoint at {tmp_path}/gone.ckpt"
    assert message in result.stderr
    assert message in (reference / "train.log").read_text()
    assert (reference / "checkpoints" / "last.ckpt").is_file()  # the run directory stays
