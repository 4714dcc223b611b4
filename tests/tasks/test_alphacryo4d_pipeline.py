"""The AlphaCryo4D task end to end on volumes given as files (no class3d): stages, records,
resuming, voting exclusivity and the RELION subsets."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from tests.helpers import compose_train


def _make_volumes(cfg, folder, fold=3, fractions=(0.7, 0.2, 0.1), seed=0):
    """Resampled volumes as the class3d stage would make them: leave-one-out unions of the
    consensus particles, each state split into a large class (at the state's position) and
    smaller ones further off; each map a blob at that position plus noise."""
    import hydra

    from hetero.data.io.mrc import write_volume
    from hetero.data.synthetic import load_truth
    from hetero.models.alphacryo4d.shuffling import leave_one_out

    dm = hydra.utils.instantiate(cfg.data, val_fraction=0.0, split_file=None)
    dm.prepare_data()
    dm.setup("fit")
    truth = np.asarray(load_truth(dm.truth_dir)["labels"])
    n = len(truth)
    rng = np.random.default_rng(seed)
    d = 8
    g = np.mgrid[:d, :d, :d].astype(np.float32) - d / 2
    shuffle = leave_one_out(n, fold=fold, seed=seed)
    maps, stars = [], []
    from hetero.data.io.star import write_star

    for u, union in enumerate(shuffle.unions):
        sub = rng.choice(len(fractions), len(union), p=fractions)
        for state in np.unique(truth):
            for c in range(len(fractions)):
                members = union[(truth[union] == state) & (sub == c)]
                centre = np.array([2.0 * (2 * state - 1), 0.75 * c, 0]) + rng.normal(0, 0.1, 3)
                vol = np.exp(-sum((g[i] - centre[i]) ** 2 for i in range(3)) / 2) + rng.normal(0, 0.02, (d, d, d))
                name = folder / f"u{u}_s{state}_c{c}"
                write_volume(name.with_suffix(".mrc"), vol.astype(np.float32), 20.0)  # the 160 Å box
                write_star(name.with_suffix(".star"), dm.table, members)
                maps.append(str(name.with_suffix(".mrc")))
                stars.append(str(name.with_suffix(".star")))
    return maps, stars, truth, dm


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):

    tmp = tmp_path_factory.mktemp("ac4d")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse cache fixture is not active yet
        mp.setenv("HETERO_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        mp.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", ""))  # restored after the run
        try:
            return _run(tmp)
        finally:
            torch.set_num_threads(threads)


def _run(tmp):
    from hetero.tasks.alphacryo4d import run_pipeline

    vol_dir = tmp / "volumes"
    vol_dir.mkdir()
    cfg = compose_train(tmp / "run", ["model=alphacryo4d"])
    maps, stars, truth, dm = _make_volumes(cfg, vol_dir)
    overrides = [
        "model=alphacryo4d",
        "alphacryo4d.resampling.source=files",
        f"alphacryo4d.resampling.files.maps={vol_dir}/*.mrc",
        f"alphacryo4d.resampling.files.stars={vol_dir}/*.star",
        "alphacryo4d.autoencoder.epochs=2",
        "alphacryo4d.autoencoder.batch_size=4",
        "alphacryo4d.autoencoder.val_fraction=0.2",
        "alphacryo4d.manifold.tsne.perplexity=5",
        "alphacryo4d.manifold.tsne.max_iter=500",
        "alphacryo4d.manifold.tsne.learning_rate=50",
        "alphacryo4d.path.states=minima",
        "alphacryo4d.path.k=2",
        "alphacryo4d.path.n_images=40",
        "alphacryo4d.path.max_steps=2000",
        "alphacryo4d.landscape.interpolation=linear",
        "alphacryo4d.landscape.max_minima=2",
        # The landscape of these 24 volumes has its two minima with 2 threads and one with 1
        # (floating-point order in the autoencoder and t-SNE): pinned, so the result does not
        # depend on the threads an earlier test left (a DDP test leaves 1) or on the load
        "threads=2",
    ]
    cfg = compose_train(tmp / "run", overrides)
    metrics, objects = run_pipeline(cfg)
    return cfg, metrics, objects, truth, dm, tmp / "run", overrides


def test_every_stage_ran_and_recorded(pipeline_run):
    cfg, metrics, objects, truth, dm, run_dir, _ = pipeline_run
    records = json.loads((run_dir / "alphacryo4d" / "pipeline.json").read_text())
    assert set(records) == {"shuffling", "resampling", "autoencoder", "manifold", "landscape", "path", "voting"}
    for rec in records.values():
        assert all((run_dir / p).exists() for p in rec["outputs"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["method"] == "alphacryo4d" and manifest["result_loader"].endswith("load_alphacryo4d_result")
    assert records["resampling"]["summary"]["n_volumes"] == 4 * 2 * 3


def test_voting_recovers_the_states_exclusively(pipeline_run):
    cfg, metrics, objects, truth, dm, run_dir, _ = pipeline_run
    labels = np.load(run_dir / "alphacryo4d" / "voting" / "labels.npy")
    assert labels.shape == truth.shape
    kept = labels >= 0
    assert kept.mean() > 0.9  # volumes of one state are one cluster: every particle has 3 votes there
    # each voted state is one true state
    for k in np.unique(labels[kept]):
        frac = np.bincount(truth[labels == k]).max() / np.sum(labels == k)
        assert frac > 0.99
    assert len(np.unique(labels[kept])) == 2


def test_subsets_are_relion_star_files_with_the_original_columns(pipeline_run):
    import starfile

    from hetero.analysis.voting import star_file_keys, table_keys

    cfg, metrics, objects, truth, dm, run_dir, _ = pipeline_run
    folder = run_dir / "alphacryo4d" / "voting" / "subsets"
    labels = np.load(run_dir / "alphacryo4d" / "voting" / "labels.npy")
    total = 0
    for name in ("state_000", "state_001", "discarded"):
        star = starfile.read(folder / f"{name}.star", always_dict=True)
        rows = star["particles"]
        idx = np.load(folder / f"{name}.npy")
        total += len(idx)
        # the same images (names kept where they resolve, else absolute)
        assert list(star_file_keys(folder / f"{name}.star")) == list(table_keys(dm.table)[idx])
        assert set(dm.table.rows.columns) <= set(rows.columns)
    assert total == len(labels)


def test_rerun_skips_up_to_date_stages_and_recomputes_changed_ones(pipeline_run, caplog):
    from hetero.tasks.alphacryo4d import run_pipeline

    cfg, metrics, objects, truth, dm, run_dir, overrides = pipeline_run
    before = json.loads((run_dir / "alphacryo4d" / "pipeline.json").read_text())
    cfg2 = compose_train(run_dir, [*overrides, "alphacryo4d.voting.radius=1000"])
    run_pipeline(cfg2)
    after = json.loads((run_dir / "alphacryo4d" / "pipeline.json").read_text())
    for name in ("shuffling", "resampling", "autoencoder", "manifold", "landscape", "path"):
        assert after[name]["finished"] == before[name]["finished"], name
    assert after["voting"]["fingerprint"] != before["voting"]["fingerprint"]
    assert after["voting"]["summary"]["radius"] == 1000


def test_a_moved_run_stays_up_to_date(pipeline_run, tmp_path):
    """Paths inside the run directory (split and dropped-particle files) are not part of the
    stages' fingerprints: a run copied elsewhere reruns nothing."""
    import shutil

    from hetero.tasks.alphacryo4d import run_pipeline

    cfg, metrics, objects, truth, dm, run_dir, overrides = pipeline_run
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    before = json.loads((moved / "alphacryo4d" / "pipeline.json").read_text())
    run_pipeline(compose_train(moved, overrides))
    after = json.loads((moved / "alphacryo4d" / "pipeline.json").read_text())
    for name in ("shuffling", "resampling", "autoencoder", "manifold", "landscape", "path"):
        assert after[name]["finished"] == before[name]["finished"], name  # (voting: another test's radius)


def test_selected_stage_needs_its_inputs(tmp_path):
    from hetero.tasks.alphacryo4d import run_pipeline
    from hetero.tasks.alphacryo4d.pipeline import StageOutOfDateError

    cfg = compose_train(tmp_path, ["model=alphacryo4d", "alphacryo4d.stages=[voting]"])
    with pytest.raises(StageOutOfDateError, match="shuffling"):
        run_pipeline(cfg)
    with open_dict(cfg):
        cfg.alphacryo4d.stages = ["nonsense"]
    with pytest.raises(ValueError, match="unknown stage"):
        run_pipeline(cfg)


def test_analyze_reconstructs_each_voted_state_and_plays_the_path(pipeline_run):
    """``analyze.py`` on the run through its manifest (no method branch in shared code): the
    voted states are reconstructed from their particles with half maps and FSC, the method step
    draws the volume landscape and writes the path series, and the voted states score
    against the truth."""
    from hetero.tasks.analyze import analyze
    from tests.analysis.test_analyze_task import compose_analyze

    cfg, metrics, objects, truth, dm, run_dir, _ = pipeline_run
    out = run_dir / "analysis_test"
    acfg = compose_analyze([f"run_dir={run_dir}", f"output_dir={out}", "n_clusters=2", "umap.enabled=false",
                            "pca_components=2", "n_pc_traversals=0", "reconstruction.clusters=false",
                            "reconstruction.truth_states=false", "reconstruction.preweight_iterations=2",
                            "subsets.enabled=false", "per_image_fsc_samples=4"])
    m = analyze(acfg)
    assert m["method"] == "alphacryo4d"
    kind = out / "maps" / "reconstructed" / "method_voted_state"
    for k in range(2):
        for suffix in ("", "_half1", "_half2"):
            assert (kind / f"voted_state_{k:03d}{suffix}.mrc").is_file()
    labels = np.load(run_dir / "alphacryo4d" / "voting" / "labels.npy")
    rows = m["reconstructed"]["method_voted_state"]
    assert [r["particles"] for r in rows][:2] == np.bincount(labels[labels >= 0]).tolist()
    assert sorted(p.name for p in (out / "maps" / "path").glob("*.mrc")) == ["path_000.mrc", "path_001.mrc"]
    assert (out / "figures" / "alphacryo4d_landscape.png").is_file()
    scores = m["alphacryo4d"]["scores"]
    assert scores["precision_mean"] > 0.99 and scores["recall_mean"] > 0.9
    assert "AlphaCryo4D" in (out / "report.html").read_text()
