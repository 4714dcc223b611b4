"""OPUS-DSD recovers planted heterogeneity: train.py's task then analyze.py's task on a small
synthetic dataset with three discrete conformations, scored against the ground truth.

This is the end-to-end check of the whole stack (star/mrcs reader, data module, HEALPix
sampler, encoder, decoder, Fourier-slice renderer with CTF, losses, checkpointing, inference,
analysis and report). About two minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests.helpers import CONF_DIR, compose_train

RECOVERY = [
    "model=opusdsd_cpu",
    "predict=true",
    "callbacks=default",
    "++callbacks.progress_bar=null",
    "data.particles.n_particles=1500",
    "data.particles.box_size=32",
    "data.particles.pixel_size_angstrom=5.0",
    "data.particles.n_states=3",
    "data.particles.snr=2.0",
    "data.box_size=32",
    "data.batch_size=16",
    "data.val_fraction=0.05",
    "optim.optimizer.lr=1e-3",
    "optim.scheduler.gamma=1.0",
    "loss.tv.normalization=mean",
    "loss.l1.normalization=mean",
    "trainer.max_epochs=12",
]


def test_opusdsd_separates_three_planted_states(tmp_path):
    from hetero.tasks.analyze import analyze
    from hetero.tasks.train import run

    run_dir = tmp_path / "run"
    cfg = compose_train(run_dir, RECOVERY, tiny_synthetic=False)
    val_loss = run(cfg)
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run_dir / "checkpoints").glob("*.ckpt"))) == 2  # never one per epoch
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["method"] == "opusdsd"
    assert (run_dir / manifest["parts"]["latents"]["path"] / "z_mu.npy").is_file()
    assert val_loss is not None and val_loss > 0

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        acfg = compose(
            config_name="analyze",
            overrides=[
                f"run_dir={run_dir}", "progress=false", "n_clusters=6", "pca_components=3",
                "n_pc_traversals=1", "pc_traversal.steps=3", "umap.enabled=false",
                "per_image_fsc_samples=30",
            ],
        )
    metrics = analyze(acfg)
    gt = metrics["ground_truth"]
    # The latent space separates the three conformations (k-means with k = 3 vs the truth).
    assert gt["k_true"] == 3
    assert gt["ari"] >= 0.9, gt
    # The oracle (true pose/CTF, best-fitting state) is the ceiling: ~1 at this SNR.
    assert gt["oracle_ari"] >= 0.95 and gt["ari_fraction_of_oracle"] == pytest.approx(gt["ari"] / gt["oracle_ari"])
    # Maps decoded at each state's mean latent resemble that state's true volume.
    assert gt["per_state_res_0.5_mean"] < 25.0, gt["per_state_fsc"]
    out = run_dir / "analysis"
    assert json.loads((out / "metrics.json").read_text())["ground_truth"]["ari"] == pytest.approx(gt["ari"])
    assert len(list((out / "maps" / "decoded" / "clusters").glob("*.mrc"))) == 6
    # Maps reconstructed from each cluster's particles at the original box, with half maps.
    assert len(list((out / "maps" / "reconstructed" / "clusters").glob("cluster_*_half2.mrc"))) == 6
    rec = metrics["reconstructed"]
    assert sum(r["particles"] for r in rec["clusters"]) == 1500
    assert all(r["res_0.143_masked"] < 40.0 for r in rec["clusters"])
    # Scored against the true states beside the decoded maps (the planted-state proof that
    # cluster maps beat the consensus is tests/analysis/test_reconstruction.py).
    scored = gt["reconstructed"]
    assert {"clusters", "consensus", "truth_states"} <= set(scored)
    assert all(r["res_0.5"] < 40.0 for r in scored["truth_states"]["per_state"])
    assert gt["closer_to_truth"] in ("decoded", "reconstructed")
    report = (out / "report.html").read_text()
    for name in ("Summary", "Latent space", "Clusters", "Decoded maps", "Reconstructed maps", "Ground truth"):
        assert f"<h2>{name}</h2>" in report
    assert "oracle ARI" in report
    assert Path(out / "subsets").is_dir()
