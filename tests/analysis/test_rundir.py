"""Run directory checks: clear errors naming what is missing; the manifest, read or synthesised."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from hetero.analysis.rundir import DataUnavailableError, IncompleteRunDirError, RunDir
from hetero.utils.manifest import ManifestError
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


def test_manifest_is_read_and_validated(tmp_path):
    run, _ = make_run_dir(tmp_path)
    opened = RunDir.open(run)
    assert opened.manifest["method"] == "fake"
    assert opened.part_path("latents").parent == run / "latents"
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["result_loader"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"manifest.json: missing field\(s\) result_loader"):
        RunDir.open(run)


def test_manifest_synthesised_for_older_runs(tmp_path):
    """A run from before manifests: the model class's default manifest, never a guess from files."""
    run, _ = make_run_dir(tmp_path)
    (run / "manifest.json").unlink()
    cfg = OmegaConf.load(run / "config_resolved.yaml")
    cfg.model = {"_target_": "hetero.models.opusdsd.OpusDSD"}
    OmegaConf.save(cfg, run / "config_resolved.yaml")
    manifest = RunDir.open(run).manifest
    assert manifest["method"] == "opusdsd" and manifest["format"] == 1
    assert manifest["result_loader"] == "hetero.analysis.result.load_model_result"
    assert manifest["parts"]["model"]["path"] == "checkpoints/best.ckpt"


def test_data_error_names_what_failed_and_what_to_pass(tmp_path):
    run, _ = make_run_dir(tmp_path)
    stack = tmp_path / "data" / "particles.mrcs"
    stack.rename(tmp_path / "moved.mrcs")
    with pytest.raises(DataUnavailableError) as err:
        RunDir.open(run).datamodule("particle subsets")
    msg = str(err.value)
    assert "particle subsets needs the particle data" in msg and str(stack) in msg
    assert "data.datadir=" in msg and "reconstruction.enabled=false" in msg
    opened = RunDir.open(run)
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved.mrcs").rename(tmp_path / "moved" / "particles.mrcs")
    opened.override_data({"datadir": str(tmp_path / "moved"), "particles": None})
    assert len(opened.datamodule("subsets").table) == 120
