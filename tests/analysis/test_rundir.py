"""Run directory checks: clear errors naming what is missing."""

from __future__ import annotations

import pytest

from hetero.analysis.rundir import IncompleteRunDirError, RunDir
from tests.analysis.fakes import make_run_dir


def test_missing_run_dir(tmp_path):
    with pytest.raises(IncompleteRunDirError, match="does not exist"):
        RunDir.open(tmp_path / "nope")


def test_incomplete_run_dir_names_missing_pieces(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(IncompleteRunDirError) as err:
        RunDir.open(tmp_path)
    msg = str(err.value)
    assert "config_resolved.yaml" in msg and "data_info.json" in msg
    assert "checkpoint 'best'" in msg and "no .ckpt files" in msg


def test_checkpoint_choice(tmp_path):
    run, _ = make_run_dir(tmp_path)
    assert RunDir.open(run).checkpoint.name == "best.ckpt"
    with pytest.raises(IncompleteRunDirError, match=r"checkpoint 'last'.*found best.ckpt"):
        RunDir.open(run, "last")
    (run / "checkpoints" / "best.ckpt").rename(run / "checkpoints" / "last.ckpt")
    assert RunDir.open(run, "best").checkpoint.name == "last.ckpt"  # best falls back to last
    model = RunDir.open(run).load_model()
    assert model.template_voxel_size() == 2.0
    assert RunDir.open(run).latents()["z_mu"].shape == (120, 2)
