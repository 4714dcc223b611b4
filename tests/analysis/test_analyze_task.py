"""The analysis task end to end on a fake run directory (analytic decoder, real tiny particle
files, user ground truth)."""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from hetero.data.io import read_particles
from hetero.tasks.analyze import analyze
from tests.analysis.fakes import APIX, BOX, make_run_dir

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def compose_analyze(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="analyze", overrides=["progress=false", *overrides])


def test_analyze_fake_run(tmp_path):
    run, truth = make_run_dir(tmp_path)
    vols = ",".join(str(p) for p in truth["volumes"])
    cfg = compose_analyze(
        [
            f"run_dir={run}",
            "n_clusters=4",
            "pca_components=2",
            "n_pc_traversals=1",
            "pc_traversal.steps=3",
            "umap.enabled=false",
            "per_image_fsc_samples=12",
            f"+truth.labels={truth['labels']}",
            f"+truth.volumes=[{vols}]",
        ]
    )
    metrics = analyze(cfg)
    out = run / "analysis"
    assert json.loads((out / "metrics.json").read_text())["n_particles"] == 120
    assert sorted(p.name for p in (out / "maps" / "decoded" / "clusters").glob("*.mrc")) == [
        f"cluster_00{i}.mrc" for i in range(4)
    ]
    assert len(list((out / "maps" / "decoded" / "pc1").glob("*.mrc"))) == 3
    assert (out / "maps" / "decoded" / "pc1" / "pc1.cxc").is_file()
    with mrcfile.open(out / "maps" / "decoded" / "clusters" / "cluster_000.mrc") as mrc:
        assert mrc.data.shape == (BOX, BOX, BOX) and mrc.voxel_size.x == pytest.approx(APIX)
    gt = metrics["ground_truth"]
    assert gt["ari"] == pytest.approx(1.0) and gt["ami"] == pytest.approx(1.0)
    assert len(gt["per_state_fsc"]) == 3 and gt["per_image_fsc_n"] == 12
    # The decoder reproduces the truth up to the template Nyquist (0.25/Å = half the box's):
    # about half the AUC ceiling, and the 0.5 crossing just above 4 Å.
    assert 0.2 < gt["per_state_auc_mean"] < gt["auc_ceiling"]
    assert gt["per_state_res_0.5_mean"] < 5.0
    # Reconstructed from the particles at the original box: both half maps, FSC, table.
    rec = out / "maps" / "reconstructed"
    names = {p.name for p in (rec / "clusters").iterdir()}
    assert {
        "cluster_000.mrc",
        "cluster_000_half1.mrc",
        "cluster_000_half2.mrc",
        "cluster_000_fsc.csv",
        "resolution.csv",
        "clusters.cxc",
    } <= names
    assert (rec / "consensus" / "consensus_half2.mrc").is_file()
    rows = metrics["reconstructed"]["clusters"]
    assert sum(r["particles"] for r in rows) == 120
    assert all(r["half1"] + r["half2"] == r["particles"] for r in rows)
    # A sigma = 3 Å blob has ~1e-3 of its power left at 1/6 Å: the half maps agree to ~6 Å.
    assert all(r["res_0.143_unmasked"] < 8.0 for r in rows if r["particles"] > 10)
    # Each true state's majority cluster is reconstructed close to its true map, and the
    # analytic decoder (the truth itself up to 4 Å) stays closer: the report says which.
    scored = gt["reconstructed"]["clusters"]["per_state"]
    assert len({r["group"] for r in scored}) == 3 and all(r["res_0.5"] < 8.0 for r in scored)
    assert gt["closer_to_truth"] == "decoded"
    # Particle subsets, one per cluster, open where they are written and hold that cluster.
    labels = np.load(out / "clusters" / "labels.npy")
    seen = []
    for k in range(4):
        star = out / "subsets" / f"cluster_00{k}.star"
        sub = read_particles(star)  # no datadir: names resolve from the subset's folder
        idx = np.load(out / "subsets" / f"cluster_00{k}.npy")
        np.testing.assert_array_equal(sub.image_indices, idx)
        assert (labels[idx] == k).all()
        seen.append(idx)
    assert sorted(np.concatenate(seen).tolist()) == list(range(120))
    assert metrics["subsets"] == {f"cluster_00{k}": len(seen[k]) for k in range(4)}
    report = (out / "report.html").read_text()
    for name in (
        "Summary",
        "Training",
        "Latent space",
        "Clusters",
        "Decoded maps",
        "Reconstructed maps",
        "Ground truth",
        "Files",
    ):
        assert f"<h2>{name}</h2>" in report
    assert report.count("data:image/png;base64,") >= 10  # UMAP is covered in test_latent


def test_analyze_rejects_too_many_clusters(tmp_path):
    from hetero.utils.errors import ConfigError

    run, _ = make_run_dir(tmp_path, n_per_state=2)
    cfg = compose_analyze([f"run_dir={run}", "n_clusters=7", "umap.enabled=false"])
    with pytest.raises(ConfigError, match="n_clusters=7 is larger than the number of particles"):
        analyze(cfg)


def test_analyze_refuses_an_option_no_step_of_the_run_reads(tmp_path):
    """DynaMight's backprojection block switched on for another method's run (or for a run whose
    manifest predates the step) is refused before any output is written, not ignored."""
    run, _ = make_run_dir(tmp_path, n_per_state=2)
    cfg = compose_analyze([f"run_dir={run}", "backprojection.enabled=true", f"output_dir={tmp_path / 'a'}"])
    with pytest.raises(ValueError, match=r"backprojection.enabled=true: no analysis step of this run"):
        analyze(cfg)
    assert not (tmp_path / "a").exists()
    step = "hetero.models.dynamight.backprojection_step.deformed_backprojection"
    from hetero.analysis.steps import resolve_step, unclaimed_options

    assert unclaimed_options(cfg, [resolve_step(step)]) == []


def test_analyze_homogeneous_run(tmp_path):
    """Embedding dimension 0: the consensus map, decoded and reconstructed, scored against every true state."""
    from hetero.analysis.latents import CheckpointId, write_latents

    run, truth = make_run_dir(tmp_path, n_per_state=5)
    write_latents(
        run / "latents",
        CheckpointId.of(run / "checkpoints" / "best.ckpt"),
        {"z_mu": np.zeros((15, 0), np.float32)},
    )
    vols = ",".join(str(p) for p in truth["volumes"])
    cfg = compose_analyze(
        [f"run_dir={run}", f"+truth.labels={truth['labels']}", f"+truth.volumes=[{vols}]"]
    )
    metrics = analyze(cfg)
    assert (run / "analysis" / "maps" / "decoded" / "consensus" / "consensus_000.mrc").is_file()
    assert (run / "analysis" / "maps" / "reconstructed" / "consensus" / "consensus.mrc").is_file()
    per_state = metrics["ground_truth"]["per_state_fsc"]
    assert per_state[1]["auc"] > per_state[0]["auc"]  # the consensus blob sits at state 1
    assert "ari" not in metrics["ground_truth"] and "clusters" not in metrics
    assert "<h2>Ground truth</h2>" in (run / "analysis" / "report.html").read_text()


def test_missing_stack_stops_the_analysis_naming_it(tmp_path):
    """A moved stack is an error naming the stack and what to pass, never a skipped step."""
    from hetero.analysis.rundir import DataUnavailableError

    run, _ = make_run_dir(tmp_path, n_per_state=4)
    stack = tmp_path / "data" / "particles.mrcs"
    stack.unlink()
    with pytest.raises(DataUnavailableError) as err:
        analyze(compose_analyze([f"run_dir={run}", "n_clusters=2", "umap.enabled=false"]))
    assert str(stack) in str(err.value) and "data.datadir=" in str(err.value)
    assert not (run / "analysis" / "report.html").exists()


def test_a_failed_reanalysis_leaves_the_earlier_one_unchanged(tmp_path):
    """Re-analysing with other options and failing partway (here: the stack moved after the
    first analysis, so the reconstructions fail after the clusters were written) puts back the
    earlier analysis file for file; a successful one then replaces it as a whole."""
    run, _ = make_run_dir(tmp_path, n_per_state=4)
    out = run / "analysis"
    analyze(compose_analyze([f"run_dir={run}", "n_clusters=2", "umap.enabled=false"]))
    files = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert json.loads((out / "metrics.json").read_text())["clusters"]["k"] == 2
    stack = tmp_path / "data" / "particles.mrcs"
    moved = stack.with_suffix(".moved")
    stack.rename(moved)
    with pytest.raises(Exception, match="particles.mrcs"):
        analyze(compose_analyze([f"run_dir={run}", "n_clusters=3", "umap.enabled=false"]))
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == files
    assert not (run / ".analysis.previous").exists()
    moved.rename(stack)
    analyze(compose_analyze([f"run_dir={run}", "n_clusters=3", "umap.enabled=false"]))
    assert json.loads((out / "metrics.json").read_text())["clusters"]["k"] == 3
    assert (out / "subsets" / "cluster_002.npy").is_file()
    assert not (run / ".analysis.previous").exists()


def test_an_output_dir_that_is_not_an_analysis_is_refused(tmp_path):
    """A re-analysis replaces its output folder as a whole, so a folder holding anything an
    analysis did not write (a user's folder, files added to an analysis, the run directory) is
    refused before anything moves."""
    run, _ = make_run_dir(tmp_path, n_per_state=2)
    base = ["n_clusters=2", "umap.enabled=false", f"run_dir={run}"]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"output_dir=.*mine holds files that no analysis wrote \(notes.txt\)"):
        analyze(compose_analyze([*base, f"output_dir={other}"]))
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    run_files = sorted(p for p in run.rglob("*"))
    for target in (run, tmp_path):  # the run directory, a folder above it
        with pytest.raises(ValueError, match="is the run directory or a folder above it"):
            analyze(compose_analyze([*base, f"output_dir={target}"]))
    assert sorted(p for p in run.rglob("*")) == run_files
    analyze(compose_analyze(base))  # an analysis, then a user's files added to it, at any depth
    (run / "analysis" / "session.cxs").write_text("mine")
    (run / "analysis" / "subsets" / "my_subset.star").write_text("mine too")
    with pytest.raises(ValueError, match=r"holds files that no analysis wrote \(session.cxs, subsets/my_subset.star\)"):
        analyze(compose_analyze(base))
    assert (run / "analysis" / "session.cxs").read_text() == "mine"
    (run / "analysis" / "session.cxs").unlink()
    with pytest.raises(ValueError, match=r"\(subsets/my_subset.star\)"):
        analyze(compose_analyze(base))
    assert (run / "analysis" / "subsets" / "my_subset.star").read_text() == "mine too"


def sigterm_step(ctx) -> None:
    """An analysis step during which the scheduler stops the job."""
    import os
    import signal

    (ctx.out / "half-written.mrc").write_text("partial")
    os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_puts_the_earlier_analysis_back(tmp_path):
    import signal

    from hetero.utils.errors import Preempted

    run, _ = make_run_dir(tmp_path, n_per_state=2)
    base = ["n_clusters=2", "umap.enabled=false", f"run_dir={run}"]
    analyze(compose_analyze(base))
    out = run / "analysis"
    files = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="SIGTERM"):
        analyze(compose_analyze([*base, "steps=[embedding,tests.analysis.test_analyze_task.sigterm_step]"]))
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == files
    assert signal.getsignal(signal.SIGTERM) is handler  # the task's handler is removed again


def test_multirun_jobs_write_their_own_analysis_folders(tmp_path, monkeypatch):
    """Under ``-m`` jobs sharing one output_dir (the default or one given) would replace each
    other's analysis: each gets ``<output_dir>_<job number>``."""
    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    import hetero.tasks.cli as cli
    from hetero.tasks.analyze import _output_dir
    from hetero.utils.errors import ConfigError

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(cli, "_multirun", lambda: True)
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: SimpleNamespace(job=SimpleNamespace(num=3))))
    for given, expected in ((run / "analysis", run / "analysis_3"), (f"{tmp_path}/mine/", tmp_path / "mine_3")):
        cfg = OmegaConf.create({"run_dir": str(run), "output_dir": str(given)})
        assert _output_dir(cfg, run) == expected.resolve()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~ is expanded before the suffix
    assert _output_dir(OmegaConf.create({"run_dir": str(run), "output_dir": "~/out"}), run) == \
        (tmp_path / "home" / "out_3").resolve()
    with pytest.raises(ConfigError, match="is the run directory"):  # refused, not made a sibling
        _output_dir(OmegaConf.create({"run_dir": str(run), "output_dir": str(run)}), run)
    monkeypatch.setattr(cli, "_multirun", lambda: False)
    assert _output_dir(OmegaConf.create({"run_dir": str(run), "output_dir": f"{tmp_path}/mine"}), run) == (tmp_path / "mine").resolve()
