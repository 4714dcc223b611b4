"""Maps reconstructed from the particles (issue #17, part 1): agreement with the physics
reconstruction, disjoint half sets, planted states recovered better than the consensus,
one pass at the original box, two processes all-reduced to the one-process maps."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import torch

from hetero.analysis.reconstruction import plan_batches, reconstruct_groups
from hetero.analysis.resolution import fsc_table
from hetero.data.datamodule import ParticleDataModule
from hetero.data.synthetic import SyntheticDataset, load_truth
from hetero.physics.ctf import compute_ctf, ctf_table_compute
from hetero.physics.fsc import fsc
from hetero.physics.reconstruction import BackprojectionAccumulator
from hetero.physics.rotations import random_rotations
from tests.analysis.dist_worker import fake_batches, reconstruct_on_rank
from tests.analysis.fakes import fake_context, fake_result

BOX, APIX, TRAIN_BOX = 24, 8.0, 12


def _synthetic(tmp_path_factory, snr):
    ds = SyntheticDataset(
        kind="discrete",
        n_particles=240,
        box_size=BOX,
        pixel_size_angstrom=APIX,
        n_states=2,
        snr=snr,
        seed=3,
        cache_dir=tmp_path_factory.getbasetemp() / "recon-synthetic",
    )
    ds.ensure()
    return ds


def _datamodule(ds, tmp_path):
    dm = ParticleDataModule(
        ds.star_path,
        box_size=TRAIN_BOX,
        num_workers=0,
        persistent_workers=False,
        sampler="random",
        batch_size=16,
        norm_sample_size=50,
        split_file=str(tmp_path / "split.npz"),
    )
    dm.prepare_data()
    dm.setup("predict")
    return dm


@pytest.fixture(scope="module")
def noiseless(tmp_path_factory):
    return _synthetic(tmp_path_factory, None)


def test_original_size_loader_and_planned_batches(noiseless, tmp_path):
    """The predict loader delivers original-size images (geometry to match) for given batches."""
    dm = _datamodule(noiseless, tmp_path)
    batch = next(iter(dm.predict_dataloader(original_size=True, batches=[np.array([5, 2, 9])])))
    assert batch["image"].shape == (3, BOX, BOX) and batch["index"].tolist() == [5, 2, 9]
    assert batch["apix"][0].item() == pytest.approx(APIX)
    np.testing.assert_allclose(
        batch["origin_px"].numpy(), dm.table.origins_px[[5, 2, 9]], rtol=1e-5
    )
    cropped = next(iter(dm.predict_dataloader()))
    assert cropped["image"].shape[-1] == TRAIN_BOX
    keys = np.array([[0, 1, 0], [1, -1, 1], [0, 1, 0], [-1, -1, 0], [0, 1, 1], [0, 1, 0]])
    batches = plan_batches(keys, 2)
    assert sorted(np.concatenate(batches).tolist()) == [0, 1, 2, 4, 5]  # row 3 is in no group
    for b in batches:
        assert (keys[b] == keys[b[0]]).all() and len(b) <= 2


def test_noiseless_one_state_subset_equals_the_physics_reconstruction(noiseless, tmp_path):
    """Cluster = the particles of true state 0: its half maps and full map equal a direct
    BackprojectionAccumulator fed from the .mrcs and the ground truth's poses, shifts and CTF,
    and the map matches the true state."""
    dm = _datamodule(noiseless, tmp_path)
    truth = load_truth(noiseless.truth_dir)
    labels = truth["labels"]
    maps = reconstruct_groups(
        lambda b: dm.predict_dataloader(original_size=True, batches=b),
        {"clusters": labels},
        dm.table.half_set,
        BOX,
        batch_size=16,
    )
    got = maps["clusters"][0]
    with mrcfile.open(noiseless.truth_dir + "/particles.mrcs") as mrc:
        stack = np.asarray(mrc.data, dtype=np.float32)
    accs = []
    for half in (0, 1):
        idx = np.flatnonzero((labels == 0) & (truth["half_set"] == half))
        acc = BackprojectionAccumulator(BOX, 2, dtype=torch.float32)
        ctf = compute_ctf(
            acc.ctf_size,
            APIX,
            torch.tensor(truth["defocus_u_angstrom"][idx]),
            torch.tensor(truth["defocus_v_angstrom"][idx]),
            torch.tensor(truth["defocus_angle_deg"][idx]),
            noiseless.voltage_kv,
            noiseless.spherical_aberration_mm,
            noiseless.amplitude_contrast,
        )
        images = torch.from_numpy(stack[idx]) * dm.norm_scale
        acc.add(
            images,
            torch.tensor(truth["rotations"][idx], dtype=torch.float32),
            torch.tensor(truth["shifts_px"][idx], dtype=torch.float32),
            ctf,
        )
        accs.append(acc)
    assert got.n_half == (accs[0].count, accs[1].count) and sum(got.n_half) == int(
        (labels == 0).sum()
    )
    ref1, ref2 = accs[0].reconstruct(1.0), accs[1].reconstruct(1.0)
    accs[0].merge(accs[1])
    ref = accs[0].reconstruct(1.0)
    for a, b in ((got.half1, ref1), (got.half2, ref2), (got.full, ref)):
        assert torch.allclose(a, b.float(), atol=1e-4 * float(b.abs().max()))
    curve = fsc(got.full, torch.from_numpy(truth["volumes"][0]))
    assert curve[1 : BOX // 4 + 1].min() > 0.9, curve
    other = fsc(got.full, torch.from_numpy(truth["volumes"][1]))
    assert curve[2 : BOX // 4 + 1].mean() > other[2 : BOX // 4 + 1].mean()


def test_half_maps_use_disjoint_particles():
    """Half-set-0 images are blank: half map 1 is exactly zero, half map 2 is not, and every
    particle is used once."""
    n, d = 40, 12
    rot = random_rotations(n, generator=torch.Generator().manual_seed(1))
    half = np.arange(n) % 2
    images = torch.randn(n, d, d, generator=torch.Generator().manual_seed(2))
    images[torch.from_numpy(half == 0)] = 0
    seen = []

    def loader(batches):
        seen.extend(np.concatenate(batches).tolist())
        return fake_batches(images, rot, half)(batches)

    maps = reconstruct_groups(
        loader, {"a": np.zeros(n, int), "b": np.arange(n) % 3 - 1}, half, d, batch_size=7
    )
    assert sorted(seen) == list(range(n))
    whole = maps["a"][0]
    assert whole.n_half == (20, 20)
    assert float(whole.half1.abs().max()) == 0.0 and float(whole.half2.abs().max()) > 0
    assert [g.n_particles for g in maps["b"]] == [
        int((np.arange(n) % 3 == k).sum()) for k in (1, 2)
    ]


def test_planted_two_states_give_clusters_better_than_the_consensus(tmp_path):
    """Two planted states (a blob 6 Å left or right of the centre, exact projections at random
    poses and shifts, white noise, RELION star + mrcs) and an embedding that separates them:
    k-means finds two clusters whose reconstructions at the original box match their true
    states better than the consensus map does."""
    from hetero.analysis.steps.clustering import clustering
    from hetero.analysis.steps.reconstruction import reconstruction
    from tests.analysis import fakes

    labels = np.repeat([0, 2], 40)  # fakes.STATES[0] = -6 Å, STATES[2] = +6 Å
    star = fakes.write_particles(tmp_path / "data", labels, seed=4, noise=1.0)
    dm = ParticleDataModule(
        str(star),
        box_size=fakes.TEMPLATE,
        num_workers=0,
        persistent_workers=False,
        sampler="random",
        norm_sample_size=40,
        split_file=None,
    )
    dm.prepare_data()
    dm.setup("predict")
    planted = (labels == 2).astype(np.int64)
    rng = np.random.default_rng(0)
    z = np.stack([planted * 3.0, np.zeros(len(labels))], 1) + rng.normal(0, 0.5, (len(labels), 2))
    truth = {
        "labels": planted,
        "volumes": torch.stack(
            [fakes.blob(-6.0, fakes.BOX, fakes.APIX), fakes.blob(6.0, fakes.BOX, fakes.APIX)]
        ),
    }
    ctx = fake_context(
        tmp_path,
        fake_result(z),
        ["n_clusters=2", "reconstruction.truth_states=false"],
        datamodule=dm,
        truth=truth,
    )
    clustering(ctx)
    reconstruction(ctx)
    scored = ctx.metrics["ground_truth"]["reconstructed"]
    clusters = {r["state"]: r for r in scored["clusters"]["per_state"]}
    consensus = {r["state"]: r for r in scored["consensus"]["per_state"]}
    assert {clusters[0]["group"], clusters[1]["group"]} == {0, 1}
    for s in (0, 1):
        assert clusters[s]["particles"] == 40
        assert clusters[s]["auc"] > consensus[s]["auc"] + 0.02, (clusters[s], consensus[s])
        assert clusters[s]["res_0.5"] < consensus[s]["res_0.5"]
    rows = ctx.metrics["reconstructed"]["clusters"]
    assert all(
        r["half1"] + r["half2"] == 40 and r["res_0.143_unmasked"] < 10 and r["res_0.143_masked"]
        for r in rows
    )
    folder = ctx.out / "maps" / "reconstructed" / "clusters"
    with mrcfile.open(folder / "cluster_001_half2.mrc") as mrc:
        assert mrc.data.shape == (fakes.BOX,) * 3 and mrc.voxel_size.x == pytest.approx(fakes.APIX)
    csv = (folder / "cluster_000_fsc.csv").read_text().splitlines()
    assert csv[0] == (
        "shell,frequency_per_angstrom,resolution_angstrom,fsc_unmasked,fsc_masked,"
        "fsc_masked_uncorrected,fsc_phase_randomised"
    )
    assert len(csv) == fakes.BOX // 2 + 2
    table = [line.split(",") for line in (folder / "resolution.csv").read_text().splitlines()]
    row = dict(zip(table[0], table[1]))
    assert 0 < float(row["mask_fraction"]) < 1
    assert float(row["res_0.5_masked_uncorrected"]) == pytest.approx(rows[0]["res_0.5_masked_uncorrected"], rel=1e-3)
    assert "<h3>clusters</h3>" in "".join(ctx.sections["Reconstructed maps"])


def test_fsc_table_keeps_a_column_for_an_absent_curve():
    text = fsc_table({"fsc_unmasked": [1.0, 0.5, 0.1], "fsc_masked": None}, 4, 2.0).splitlines()
    assert text[0].endswith("fsc_unmasked,fsc_masked")
    assert text[2].split(",")[3:] == ["0.500000", ""]


def test_two_processes_all_reduce_to_the_one_process_maps(tmp_path):
    n, d = 30, 10
    gen = torch.Generator().manual_seed(5)
    images, rot = torch.randn(n, d, d, generator=gen), random_rotations(n, generator=gen)
    half, labels = np.arange(n) % 2, np.arange(n) % 3
    single = reconstruct_groups(
        fake_batches(images, rot, half), {"c": labels}, half, d, batch_size=5
    )
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(
        reconstruct_on_rank,
        nprocs=2,
        join=True,
        args=(2, f"file://{tmp_path / 'rendezvous'}", str(out), images, rot, half, labels),
    )
    multi = torch.load(out, weights_only=True)
    for g in single["c"]:
        h1, h2, full, counts = multi[g.group]
        assert tuple(counts) == g.n_half
        for a, b in ((h1, g.half1), (h2, g.half2), (full, g.full)):
            assert torch.allclose(a, b, atol=1e-5 * float(b.abs().max()))


def test_preweight_iterations_act_and_empty_halves_are_zero():
    """``preweight_iterations`` reaches every map's density compensation; a half set without
    particles gives a zero map (not reconstructed) while the other half and the full map are
    those of the particles present."""
    n, d = 24, 12
    gen = torch.Generator().manual_seed(7)
    images, rot = torch.randn(n, d, d, generator=gen), random_rotations(n, generator=gen)
    half = np.arange(n) % 2
    one_sided = np.where(half == 0, 0, -1)  # group 0 holds half-set-0 particles only
    load = fake_batches(images, rot, half)
    maps = {
        it: reconstruct_groups(load, {"c": one_sided}, half, d, preweight_iterations=it)["c"][0]
        for it in (2, 10)
    }
    batch = next(load([np.flatnonzero(half == 0)]))
    for it, got in maps.items():
        acc = BackprojectionAccumulator(d, 2, dtype=torch.float32, preweight_iterations=it)
        ctf = ctf_table_compute(batch["ctf"], acc.ctf_size, batch["apix"])
        acc.add(batch["image"], batch["rotation"], -batch["origin_px"], ctf)
        ref = acc.reconstruct(1.0)
        assert got.n_half == (n // 2, 0)
        assert torch.allclose(got.half1, ref, atol=1e-5 * float(ref.abs().max()))
        assert torch.allclose(got.full, ref, atol=1e-5 * float(ref.abs().max()))
        assert float(got.half2.abs().max()) == 0.0
    assert not torch.allclose(
        maps[2].half1, maps[10].half1, atol=1e-3 * float(maps[10].half1.abs().max())
    )


def test_a_partition_repeated_under_other_numbers_is_reconstructed_once(monkeypatch):
    import hetero.analysis.reconstruction as rec

    n, d = 30, 10
    gen = torch.Generator().manual_seed(6)
    images, rot = torch.randn(n, d, d, generator=gen), random_rotations(n, generator=gen)
    half, labels = np.arange(n) % 2, np.arange(n) % 3
    labels[[0, 1]] = -1
    renumbered = np.where(labels >= 0, np.array([2, 0, 1])[labels], -1)  # group g -> (2, 0, 1)[g]
    other = (np.arange(n) // 10).astype(np.int64)                     # a different partition
    assert rec.same_partitions({"a": labels, "b": other}) == {}
    built = []
    real = rec._group_maps
    monkeypatch.setattr(rec, "_group_maps", lambda name, g, *a: built.append((name, g)) or real(name, g, *a))
    out = reconstruct_groups(fake_batches(images, rot, half), {"a": labels, "b": renumbered, "c": other},
                             half, d, batch_size=4)
    assert sorted(built) == [("a", 0), ("a", 1), ("a", 2), ("c", 0), ("c", 1), ("c", 2)]
    alone = reconstruct_groups(fake_batches(images, rot, half), {"b": renumbered}, half, d, batch_size=4)["b"]
    for g, gm in enumerate(out["b"]):
        assert gm.labeling == "b" and gm.group == g and gm.n_half == alone[g].n_half
        torch.testing.assert_close(gm.full, alone[g].full, rtol=1e-4, atol=1e-5 * float(alone[g].full.abs().max()))
