"""Latents belong to their checkpoint (issue #18, item 4) and are refused when not finite (#16)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from hetero.analysis.latents import CheckpointId, read_latents, write_latents
from hetero.analysis.result import NonFiniteLatentsError, validate_result
from hetero.tasks.analyze import analyze
from tests.analysis.fakes import FakeModel, analyze_config, fake_result, make_run_dir

QUICK = [
    "steps=[embedding]",
    "reconstruction.enabled=false",
    "subsets.enabled=false",
    "ground_truth.enabled=false",
]


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _last_checkpoint(run):
    model = FakeModel()
    with torch.no_grad():
        model.scale.fill_(2.0)
    torch.save({"state_dict": model.state_dict()}, run / "checkpoints" / "last.ckpt")
    return CheckpointId.of(run / "checkpoints" / "last.ckpt")


def test_latents_are_read_only_for_their_checkpoint(tmp_path):
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    ida, idb = CheckpointId.of(a), CheckpointId.of(b)
    folder = write_latents(
        tmp_path / "latents", ida, {"z_mu": np.ones((3, 2), np.float32)}, particles="p.star"
    )
    assert folder.name == f"a-{ida.sha256[:12]}"
    source = json.loads((folder / "source.json").read_text())
    assert source["checkpoint"]["sha256"] == ida.sha256 and source["n_particles"] == 3
    np.testing.assert_array_equal(read_latents(folder, ida)["z_mu"], np.ones((3, 2)))
    assert read_latents(folder, idb) is None  # recorded for another checkpoint
    a.write_bytes(b"one, retrained")  # same name, other weights
    assert read_latents(folder, CheckpointId.of(a)) is None


def test_concurrent_writers_leave_one_complete_folder(tmp_path):
    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(b"w")
    cid = CheckpointId.of(ckpt)
    errors = []

    def writer(k):
        try:
            for _ in range(5):
                write_latents(tmp_path / "latents", cid, {"z_mu": np.full((50, 4), k, np.float32)})
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [p.name for p in (tmp_path / "latents").iterdir()] == [cid.key]  # no temporaries left
    z = read_latents(tmp_path / "latents" / cid.key, cid)["z_mu"]
    assert len(np.unique(z)) == 1  # one writer's complete arrays


def test_other_checkpoint_and_recompute_never_write_into_the_run(tmp_path, monkeypatch):
    run, _ = make_run_dir(tmp_path, n_per_state=4)
    before = _snapshot(run / "latents")
    last = _last_checkpoint(run)
    elsewhere = tmp_path / "elsewhere"
    analyze(
        analyze_config(
            [f"run_dir={run}", "checkpoint=last", f"output_dir={elsewhere}", "n_clusters=2", *QUICK]
        )
    )
    folder = elsewhere / "latents" / last.key
    source = json.loads((folder / "source.json").read_text())
    assert source["checkpoint"]["sha256"] == last.sha256 and source["written_by"] == "analyze"
    assert np.load(folder / "z_mu.npy").shape == (12, 2)  # computed by FakeModel.predict_step
    assert _snapshot(run / "latents") == before
    # Same checkpoint, same output: reused, no inference pass.
    import hetero.analysis.inference as inference

    monkeypatch.setattr(
        inference, "predict_particles", lambda *a, **k: pytest.fail("latents were recomputed")
    )
    metrics = analyze(
        analyze_config([f"run_dir={run}", "checkpoint=last", f"output_dir={elsewhere}", *QUICK])
    )
    assert metrics["provenance"]["latents"] == str(folder)
    # The run's own (best) latents are reused from the run for best.
    metrics = analyze(
        analyze_config([f"run_dir={run}", f"output_dir={tmp_path / 'third'}", *QUICK])
    )
    assert metrics["provenance"]["latents"].startswith(str(run / "latents"))
    monkeypatch.undo()
    # recompute_latents=true elsewhere: a new folder there, the run's untouched.
    other = tmp_path / "other"
    analyze(
        analyze_config([f"run_dir={run}", "recompute_latents=true", f"output_dir={other}", *QUICK])
    )
    best = CheckpointId.of(run / "checkpoints" / "best.ckpt")
    assert (other / "latents" / best.key / "z_mu.npy").is_file()
    assert _snapshot(run / "latents") == before


def test_unkeyed_latents_of_older_runs_are_not_reused(tmp_path):
    run, _ = make_run_dir(tmp_path, n_per_state=4, write_latents=False)
    (run / "latents").mkdir(exist_ok=True)
    np.save(run / "latents" / "z_mu.npy", np.full((12, 2), 7.0, np.float32))
    metrics = analyze(analyze_config([f"run_dir={run}", "n_clusters=2", *QUICK]))
    assert metrics["provenance"]["latents"].startswith(str(run / "analysis" / "latents"))


def test_non_finite_latents_are_refused_naming_checkpoint_and_particles(tmp_path):
    z = np.zeros((10, 2), np.float32)
    z[3, 1], z[7, 0] = np.nan, np.inf
    with pytest.raises(NonFiniteLatentsError) as err:
        validate_result(fake_result(z))
    msg = str(err.value)
    assert (
        "2 of 10 particles" in msg
        and "3 (NaN), 7 (inf)" in msg
        and "fake.ckpt" in msg
        and "fake-latents/" in msg
    )


def test_analysis_stops_before_pca_on_non_finite_latents(tmp_path):
    run, _ = make_run_dir(tmp_path, n_per_state=4, write_latents=False)
    best = CheckpointId.of(run / "checkpoints" / "best.ckpt")
    z = np.random.default_rng(0).normal(size=(12, 2)).astype(np.float32)
    z[0, 0], z[11, 1] = np.inf, np.nan  # first and last particle
    write_latents(run / "latents", best, {"z_mu": z})
    with pytest.raises(
        NonFiniteLatentsError,
        match=r"best.ckpt.*rows \(0-based, input order\): 0 \(inf\), 11 \(NaN\)",
    ):
        analyze(analyze_config([f"run_dir={run}", "n_clusters=2"]))
    assert not (run / "analysis" / "latent").exists()


def test_result_shapes_are_checked(tmp_path):
    """A loader's result with arrays that do not fit N (or maps without a voxel size) is refused
    before any step runs, naming the field."""
    z = np.zeros((6, 2), np.float32)
    bad = fake_result(z)
    bad.per_particle = {"max_prob": np.zeros(5)}
    with pytest.raises(ValueError, match=r"per_particle\['max_prob'\] must have N=6 rows"):
        validate_result(bad)
    bad = fake_result(z)
    bad.volume_embedding, bad.volume_counts = np.zeros((4, 3)), np.ones(3)
    with pytest.raises(ValueError, match=r"volume_counts must be \(V=4,\)"):
        validate_result(bad)
    bad = fake_result(z)
    bad.voxel_size = None
    with pytest.raises(ValueError, match="need voxel_size"):
        validate_result(bad)
    bad = fake_result(z, labels=np.zeros(5, np.int64))
    with pytest.raises(ValueError, match=r"labels must be \(N=6,\)"):
        validate_result(bad)
