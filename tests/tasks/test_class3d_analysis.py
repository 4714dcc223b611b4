"""class3d through train.py's and analyze.py's tasks: a tiny run on two planted states, analysed
through the run manifest and the result interface (posteriors as the embedding, argmax class as
the method's labels, class maps as its state maps), scored against the truth."""

from __future__ import annotations

import json
import re

import mrcfile
import numpy as np
import pytest
import starfile
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from sklearn.metrics import adjusted_rand_score

from tests.helpers import CONF_DIR, compose_train

CLASS3D_RUN = [
    "model=class3d",
    "model.n_classes=2",
    "model.n_iterations=5",
    "trainer.max_epochs=5",  # compose_train sets 1
    "predict=true",
    "callbacks=default",
    "++callbacks.progress_bar=null",
    "data.val_fraction=0",
    "data.batch_size=64",
]


def test_class3d_run_is_analysed_per_class(tmp_path):
    from hetero.data.synthetic import load_truth
    from hetero.tasks.analyze import analyze
    from hetero.tasks.train import run

    run_dir = tmp_path / "run"
    cfg = compose_train(run_dir, CLASS3D_RUN)
    run(cfg)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["method"] == "class3d"
    assert manifest["result_loader"] == "hetero.analysis.result.load_model_result"
    latents = run_dir / manifest["parts"]["latents"]["path"]
    post = np.load(latents / "posterior.npy")
    assert post.shape == (400, 2) and np.allclose(post.sum(1), 1, atol=1e-5)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    truth = load_truth(dm.truth_dir)["labels"]
    classes = np.load(latents / "class_number.npy")
    assert np.array_equal(classes, post.argmax(1))
    assert adjusted_rand_score(truth, classes) >= 0.95

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        acfg = compose(config_name="analyze", overrides=[
            f"run_dir={run_dir}", "progress=false", "n_clusters=2", "pca_components=2",
            "n_pc_traversals=0", "umap.enabled=false", "per_image_fsc_samples=0",
            "reconstruction.clusters=false", "reconstruction.preweight_iterations=5",
        ])
    metrics = analyze(acfg)
    out = run_dir / "analysis"
    gt = metrics["ground_truth"]
    # Posteriors as the embedding (k-means) and argmax class as the method's labels.
    assert gt["k_true"] == 2 and gt["ari"] >= 0.95 and gt["method_ari"] >= 0.95, gt
    assert gt["method_ari"] == pytest.approx(adjusted_rand_score(truth, classes))
    # The class maps themselves (state maps with their voxel size, resampled to the original box).
    maps = sorted((out / "maps" / "method").glob("class_*.mrc"))
    assert [p.name for p in maps] == ["class_001.mrc", "class_002.mrc"]  # RELION numbering
    with mrcfile.open(maps[0]) as mrc:
        assert mrc.data.shape == (32,) * 3 and mrc.voxel_size.x == pytest.approx(5.0)
    # Per-class reconstructions at the original box (32 px, 5 Å) with half maps and FSC.
    rec = out / "maps" / "reconstructed" / "method_class"
    for k in (1, 2):
        assert (rec / f"class_{k:03d}_half1.mrc").is_file() and (rec / f"class_{k:03d}_half2.mrc").is_file()
        assert (rec / f"class_{k:03d}_fsc.csv").is_file()
    with mrcfile.open(rec / "class_001.mrc") as mrc:
        assert mrc.data.shape == (32,) * 3 and mrc.voxel_size.x == pytest.approx(5.0)
    rows = metrics["reconstructed"]["method_class"]
    assert [(r["group"], r["particles"]) for r in rows] == [(k + 1, c) for k, c in enumerate(np.bincount(classes))]
    assert all(r["res_0.143_unmasked"] < 40.0 for r in rows), rows
    # Each true state's majority class is reconstructed closer to it than the consensus, as
    # close as from exactly its own particles.
    scored = gt["reconstructed"]
    assert scored["method_class"]["auc_mean"] > scored["consensus"]["auc_mean"]
    assert scored["method_class"]["auc_mean"] == pytest.approx(scored["truth_states"]["auc_mean"], abs=0.005)
    # Subsets per class and the report.
    for k in (1, 2):  # class_001 = the particles of rlnClassNumber 1, and its star file says so
        np.testing.assert_array_equal(np.load(out / "subsets" / f"class_{k:03d}.npy"), np.flatnonzero(classes + 1 == k))
        sub = starfile.read(out / "subsets" / f"class_{k:03d}.star")["particles"]
        assert set(sub["rlnClassNumber"].tolist()) == {k}
    assert {r["group"] for r in scored["method_class"]["per_state"]} == {1, 2}  # numbered as the files
    assert metrics["method_labels"]["first"] == 1
    # The method's own step: RELION-style star file with rlnClassNumber, per-iteration history.
    star = starfile.read(out / "class3d" / "particles.star")["particles"]
    assert len(star) == 400 and np.array_equal(star["rlnClassNumber"].to_numpy(), classes + 1)
    assert np.all(star["rlnMaxValueProbDistribution"].to_numpy() >= 0.5)
    history = (out / "class3d" / "iterations.csv").read_text().splitlines()
    assert len(history) == 1 + 5 and history[0].startswith("iteration,current_resolution_angstrom,")
    assert "fsc_change_angstrom_1" in history[0].split(",")
    report = (out / "report.html").read_text()
    assert "<h2>Classification</h2>" in report and "own class assignment" in report
    assert "Class distribution per EM iteration" in report
    assert (out / "figures" / "class3d_distribution.png").is_file()
    # the final class table gives the hard counts of particles.star beside the soft distribution
    for k, count in enumerate(np.bincount(classes, minlength=2)):
        assert re.search(rf'<tr><td class="num">{k + 1}</td><td class="num">[^<]+</td><td class="num">{count}</td>', report), k
    # training's "still changing" warning is repeated where the result is read, exactly when due
    last_changes = float(history[-1].split(",")[history[0].split(",").index("changes")])
    assert metrics["class3d"]["settled"] == (last_changes <= 0.01)
    assert ("still changing" in report) == (not metrics["class3d"]["settled"])
