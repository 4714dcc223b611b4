"""ParticleDataset and ParticleDataModule on small stacks written in tmp_path."""

from __future__ import annotations

import copy
import pickle
from collections import Counter
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from torch.utils.data import DataLoader, default_collate

from hetero.data.datamodule import ParticleDataModule
from hetero.data.dataset import (
    IDENTITY_CTF_ROW,
    ParticleBatch,
    ParticleDataset,
    collate_particles,
)
from hetero.data.io.errors import InputError
from hetero.data.particles import BATCH_KEYS, ParticleTable
from hetero.data.samplers import HealpixBatchSampler
from hetero.physics.ctf import ctf_table_compute
from hetero.physics.fourier import fourier_crop_2d
from hetero.physics.healpix import healpix_class
from hetero.physics.rotations import matrix_to_euler, random_rotations

BOX = 48
APIX = 2.5
N_PER_STACK = 120
N_STACKS = 2
N = N_PER_STACK * N_STACKS


def _images(n: int, box: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.5 + 3.0 * rng.standard_normal((n, box, box))).astype(np.float32)


def _write_stack(path: Path, images: np.ndarray) -> None:
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(images)
        m.voxel_size = APIX


def _rotations(n: int, seed: int = 0) -> np.ndarray:
    return random_rotations(n, generator=torch.Generator().manual_seed(seed)).double().numpy()


def make_star(
    folder: Path, nan_at: tuple[int, int] | None = None, seed: int = 0, subsets: bool = False
) -> Path:
    """RELION 3.1 star + ``N_STACKS`` stacks of noise images in ``folder``; returns the star."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for s in range(N_STACKS):
        images = _images(N_PER_STACK, BOX, seed + s)
        if nan_at is not None and nan_at[0] == s:
            images[nan_at[1], 3, 5] = np.nan
        _write_stack(folder / f"stack{s}.mrcs", images)
        names += [f"{i + 1:06d}@stack{s}.mrcs" for i in range(N_PER_STACK)]
    rng = np.random.default_rng(seed)
    euler = matrix_to_euler(torch.from_numpy(_rotations(N, seed))).numpy()
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnAmplitudeContrast": [0.1],
            "rlnSphericalAberration": [2.7],
            "rlnVoltage": [300.0],
            "rlnImagePixelSize": [APIX],
            "rlnImageSize": [BOX],
            "rlnImageDimensionality": [2],
        }
    )
    particles = pd.DataFrame(
        {
            "rlnImageName": names,
            "rlnAngleRot": euler[:, 0],
            "rlnAngleTilt": euler[:, 1],
            "rlnAnglePsi": euler[:, 2],
            "rlnOriginXAngst": rng.uniform(-5, 5, N),
            "rlnOriginYAngst": rng.uniform(-5, 5, N),
            "rlnDefocusU": rng.uniform(1e4, 2e4, N),
            "rlnDefocusV": rng.uniform(1e4, 2e4, N),
            "rlnDefocusAngle": rng.uniform(0, 180, N),
            "rlnOpticsGroup": np.ones(N, dtype=int),
        }
    )
    if subsets:
        particles["rlnRandomSubset"] = 1 + np.arange(N) % 2
    star = folder / "particles.star"
    starfile.write({"optics": optics, "particles": particles}, star, overwrite=True)
    return star


def make_table(folder: Path, poses: bool = True, ctf: bool = True) -> ParticleTable:
    """An in-memory table over stacks written with mrcfile (no reader involved)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, idx = [], []
    for s in range(N_STACKS):
        path = folder / f"mem{s}.mrcs"
        _write_stack(path, _images(N_PER_STACK, BOX, 10 + s))
        paths += [str(path)] * N_PER_STACK
        idx += list(range(N_PER_STACK))
    rng = np.random.default_rng(1)
    ctf_table = np.zeros((N, 9))
    ctf_table[:] = [1.5e4, 1.4e4, 30.0, 300.0, 2.7, 0.1, 0.0, 0.0, 1.0]
    return ParticleTable(
        image_paths=np.array(paths, dtype=object),
        image_indices=np.array(idx),
        box_size=BOX,
        pixel_size_angstrom=APIX,
        rotations=_rotations(N, 1) if poses else None,
        origins_px=rng.uniform(-3, 3, (N, 2)),
        ctf=ctf_table if ctf else None,
        source="in-memory",
    )


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> ParticleTable:
    return make_table(tmp_path_factory.mktemp("table"))


@pytest.fixture(scope="module")
def star(tmp_path_factory) -> Path:
    return make_star(tmp_path_factory.mktemp("star"))


def _dm(star_path, tmp_path, **kw) -> ParticleDataModule:
    args = dict(
        particles=str(star_path) if isinstance(star_path, (str, Path)) else star_path,
        batch_size=16, num_workers=0, val_fraction=0.1,
        split_file=str(tmp_path / "split.npz"), norm_sample_size=200,
    )
    args.update(kw)
    return ParticleDataModule(**args)


def test_missing_particle_file_names_the_option(tmp_path):
    dm = _dm(tmp_path / "run_data.star", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data.particles=.*run_data.star: particle file does not exist; pass data.particles="):
        dm.setup("fit")
    with pytest.raises(InputError, match=r"data.particles=.* is a folder; pass the particle file in it"):
        _dm(tmp_path, tmp_path).setup("fit")


# -- dataset ----------------------------------------------------------------------------------
def test_item_contract(table):
    ds = ParticleDataset(table)
    item = ds[7]
    assert tuple(item) == BATCH_KEYS
    expected = {
        "image": ((BOX, BOX), torch.float32),
        "rotation": ((3, 3), torch.float32),
        "origin_px": ((2,), torch.float32),
        "ctf": ((9,), torch.float32),
        "apix": ((), torch.float32),
        "index": ((), torch.int64),
        "half": ((), torch.int64),
        "pose_class": ((), torch.int64),
    }
    for key, (shape, dtype) in expected.items():
        assert tuple(item[key].shape) == shape, key
        assert item[key].dtype == dtype, key
    with mrcfile.mmap(table.image_paths[7], permissive=True) as m:
        raw = np.array(m.data[7])
    np.testing.assert_array_equal(item["image"].numpy(), raw)
    assert int(item["index"]) == 7
    np.testing.assert_allclose(item["rotation"].numpy(), table.rotations[7], atol=1e-6)
    assert int(item["pose_class"]) == int(healpix_class(table.rotations[7:8], 2)[0])


def test_fourier_crop_geometry(table):
    rows = np.array([5, 130, 2])
    full = ParticleDataset(table, indices=rows)
    half = ParticleDataset(table, box_size=BOX // 2, indices=rows)
    a, b = full.read_batch([0, 1, 2]), half.read_batch([0, 1, 2])
    assert b["image"].shape == (3, BOX // 2, BOX // 2)
    torch.testing.assert_close(b["image"], fourier_crop_2d(a["image"], BOX // 2))
    torch.testing.assert_close(b["apix"], 2 * a["apix"])
    torch.testing.assert_close(b["origin_px"], a["origin_px"] / 2)
    torch.testing.assert_close(b["ctf"], a["ctf"])
    assert b["index"].tolist() == rows.tolist()
    assert ParticleDataset(table, box_size=BOX)[0]["image"].shape == (BOX, BOX)


def test_contrast_inversion_and_scaling(table):
    ds = ParticleDataset(table, indices=np.arange(4))
    inv = ParticleDataset(table, indices=np.arange(4), invert_contrast=True, scale=2.0, mean=0.5)
    torch.testing.assert_close(inv[3]["image"], -(ds[3]["image"] - 0.5) * 2.0)


def test_read_batch_matches_items_and_getitems(table):
    ds = ParticleDataset(table, box_size=32, indices=np.arange(0, N, 7))
    pos = [3, 0, 11, 11]
    batch = ds.read_batch(pos)
    items = ds.__getitems__(pos)
    assert len(items) == 4 and collate_particles(items) is items.collated
    default = default_collate(items)  # what a plain DataLoader does with it
    for key in BATCH_KEYS:
        torch.testing.assert_close(batch[key], torch.stack([ds[p][key] for p in pos]))
        torch.testing.assert_close(batch[key], torch.stack([it[key] for it in items]))
        torch.testing.assert_close(batch[key], default[key])
        torch.testing.assert_close(batch[key], items.collated[key])


def test_batch_pickles_by_value_and_stays_a_dict(table):
    batch = ParticleDataset(table).read_batch([1, 2, 3])
    assert isinstance(batch, ParticleBatch) and isinstance(batch, dict)
    clone = pickle.loads(pickle.dumps(batch))
    assert type(clone) is ParticleBatch and list(clone) == list(BATCH_KEYS)
    for key in BATCH_KEYS:
        torch.testing.assert_close(clone[key], batch[key])
    assert type(copy.copy(batch)) is ParticleBatch


def test_defaults_without_poses_and_ctf(tmp_path):
    table = make_table(tmp_path, poses=False, ctf=False)
    item = ParticleDataset(table)[0]
    torch.testing.assert_close(item["rotation"], torch.eye(3))
    assert int(item["pose_class"]) == 0 and int(item["half"]) == 0
    assert tuple(item["ctf"].tolist()) == IDENTITY_CTF_ROW
    ctf = ctf_table_compute(item["ctf"][None], BOX, APIX)
    torch.testing.assert_close(ctf, torch.ones_like(ctf))


def test_lazy_and_small_when_pickled(table):
    ds = ParticleDataset(table)
    ds[0]  # opens a stack in this process
    blob = pickle.dumps(ds)
    stack_bytes = N * BOX * BOX * 4
    assert len(blob) < stack_bytes / 10, "the dataset must not carry pixels"
    clone = pickle.loads(blob)
    assert clone._stacks is None
    torch.testing.assert_close(clone[5]["image"], ds[5]["image"])


def test_maps_released_after_byte_budget(table):
    image_bytes = BOX * BOX * 4
    ds = ParticleDataset(table, unmap_every_bytes=3 * image_bytes)
    path = ds.stack_paths[0]
    ds.read_batch([0, 1])
    assert ds._collection().get(path).is_open
    ds.read_batch([2])  # third image: budget reached, maps closed
    assert not ds._collection().get(path).is_open
    keep = ParticleDataset(table, unmap_every_bytes=None)
    keep.read_batch(np.arange(20))
    assert keep._collection().get(path).is_open


def test_dataloader_with_workers(table):
    ds = ParticleDataset(table, box_size=32)
    sampler = HealpixBatchSampler(ds.pose_classes, 16, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=2)  # default collate
    seen = []
    for batch in loader:
        assert batch["image"].shape[1:] == (32, 32)
        assert len(set(batch["pose_class"].tolist())) == 1
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(N))


# -- data module ------------------------------------------------------------------------------
def test_info_after_setup(star, tmp_path):
    dm = _dm(star, tmp_path, box_size=24)
    dm.prepare_data()
    dm.setup("fit")
    info = dm.info()
    assert info == {
        "n_particles": N,
        "n_train": N - round(0.1 * N),
        "n_val": round(0.1 * N),
        "original_box": BOX,
        "original_apix": pytest.approx(APIX),
        "box_size": 24,
        "apix": pytest.approx(APIX * 2),
        "has_poses": True,
        "has_ctf": True,
        "particles_file": str(star),
    }
    assert all(isinstance(v, (int, float, bool, str)) for v in info.values())
    assert len(dm.table) == N
    assert set(np.unique(dm.table.half_set)) == {0, 1}
    assert abs(int(dm.table.half_set.sum()) - N // 2) <= 1


def test_normalisation_unit_std(star, tmp_path):
    dm = _dm(star, tmp_path, box_size=32, norm_sample_size=N)
    dm.setup("fit")
    assert dm.norm_mean == 0.0
    images = dm.train_dataset.read_batch(np.arange(len(dm.train_dataset)))["image"]
    assert abs(float(images.std()) - 1.0) < 0.01
    raw = ParticleDataset(dm.table, box_size=32).read_batch(np.arange(4))["image"]
    torch.testing.assert_close(
        dm.predict_dataset.read_batch(np.arange(4))["image"], raw * dm.norm_scale
    )


def test_loaders(star, tmp_path):
    dm = _dm(star, tmp_path, box_size=32)
    dm.setup("fit")
    dm.num_workers, dm.persistent_workers = 2, False  # exercise worker pickling of batches
    train = dm.train_dataloader()
    dm.num_workers = 0
    seen = Counter()
    for batch in train:
        assert type(batch) is ParticleBatch
        assert len(set(batch["pose_class"].tolist())) == 1
        seen.update(batch["index"].tolist())
    assert sorted(seen) == sorted(dm.train_indices.tolist())
    assert all(c == 1 for c in seen.values())
    val = [i for b in dm.val_dataloader() for i in b["index"].tolist()]
    assert val == dm.val_indices.tolist()
    pred = [i for b in dm.predict_dataloader() for i in b["index"].tolist()]
    assert pred == list(range(N))
    dm_random = _dm(star, tmp_path, sampler="random", batch_size=50)
    dm_random.setup("fit")
    assert len(dm_random.train_dataloader()) == -(-dm_random.info()["n_train"] // 50)


def test_split_saved_and_reused(star, tmp_path):
    a = _dm(star, tmp_path, split_seed=1, half_sets_seed=1)
    a.setup("fit")
    assert (tmp_path / "split.npz").is_file()
    b = _dm(star, tmp_path, split_seed=2, half_sets_seed=2)  # same file wins
    b.setup("fit")
    np.testing.assert_array_equal(a.train_indices, b.train_indices)
    np.testing.assert_array_equal(a.val_indices, b.val_indices)
    np.testing.assert_array_equal(a.table.half_set, b.table.half_set)
    assert a.norm_scale == b.norm_scale
    c = _dm(star, tmp_path / "other", split_seed=2)
    c.setup("fit")
    assert not np.array_equal(a.val_indices, c.val_indices)

    # A split file for another particle count is rejected.
    other = tmp_path / "fewer"
    star_small = make_star(other)
    lines = star_small.read_text().splitlines()
    star_small.write_text("\n".join(lines[:-5]) + "\n")
    d = _dm(star_small, tmp_path)
    with pytest.raises(InputError, match="split"):
        d.setup("fit")


def test_state_dict_restores_split_and_norm(star, tmp_path):
    a = _dm(star, tmp_path / "a", split_seed=3)
    a.setup("fit")
    state = a.state_dict()
    buf = pickle.dumps(state)  # plain tensors and numbers
    b = _dm(star, tmp_path / "b", split_seed=4)
    b.load_state_dict(pickle.loads(buf))  # before setup: applied in setup
    b.setup("fit")
    np.testing.assert_array_equal(a.val_indices, b.val_indices)
    assert b.norm_scale == a.norm_scale
    c = _dm(star, tmp_path / "c", split_seed=5)
    c.setup("fit")
    c.load_state_dict(state)  # after setup: datasets rebuilt
    assert c.val_dataset.indices.tolist() == a.val_indices.tolist()


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_nan_pixel_names_the_stack(tmp_path):
    bad = make_star(tmp_path / "bad", nan_at=(1, 17))
    dm = _dm(bad, tmp_path, val_fraction=0.0, norm_sample_size=N)
    with pytest.raises(InputError, match="stack1.mrcs"):
        dm.setup("fit")


def test_half_sets_from_input(tmp_path):
    dm = _dm(make_star(tmp_path / "sub", subsets=True), tmp_path)
    dm.setup("fit")
    assert dm.half_sets_source == "input"
    np.testing.assert_array_equal(dm.table.half_set, np.arange(N) % 2)
    batch = dm.predict_dataset.read_batch([0, 1, 2])
    assert batch["half"].tolist() == [0, 1, 0]


def test_missing_poses_with_healpix_sampler(tmp_path, monkeypatch):
    import hetero.data.datamodule as module

    table = make_table(tmp_path, poses=False)
    monkeypatch.setattr(module, "read_particles", lambda *a, **k: table)
    with pytest.raises(InputError, match="poses"):
        _dm("unused.star", tmp_path).setup("fit")
    dm = _dm("unused.star", tmp_path, sampler="random")
    dm.setup("fit")
    assert dm.info()["has_poses"] is False


def test_empty_selection(tmp_path, monkeypatch):
    import hetero.data.datamodule as module

    table = make_table(tmp_path).subset(np.zeros(0, dtype=np.int64))
    monkeypatch.setattr(module, "read_particles", lambda *a, **k: table)
    with pytest.raises(InputError, match="empty"):
        _dm("unused.star", tmp_path).setup("fit")


def test_particles_object_with_ensure(star, tmp_path):
    class Spec:
        truth_dir = "/somewhere/truth"
        calls = 0

        def ensure(self):
            Spec.calls += 1
            return str(star)

    dm = _dm(Spec(), tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    assert Spec.calls == 2 and dm.truth_dir == "/somewhere/truth"


def test_lightning_fit_sets_epoch_and_covers_train_set(star, tmp_path):
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.epochs: list[list[int]] = []

        def on_train_epoch_start(self):
            self.epochs.append([])

        def training_step(self, batch, _):
            self.epochs[-1] += batch["index"].tolist()
            return (self.w * batch["image"].mean()).sum() ** 2

        def validation_step(self, batch, _):
            self.log("val/x", batch["image"].mean())

        def predict_step(self, batch, _):
            return batch["index"]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = _dm(star, tmp_path, box_size=24)
    dm.setup("fit")
    model = Recorder()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    e0, e1 = model.epochs
    assert sorted(e0) == sorted(e1) == sorted(dm.train_indices.tolist())
    assert e0 != e1, "Lightning must reach set_epoch through batch_sampler.sampler"
    predicted = trainer.predict(model, datamodule=dm)
    assert torch.cat(predicted).tolist() == list(range(N))
