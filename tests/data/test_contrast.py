"""``data.invert_contrast: auto`` (issue #11 item 2): the contrast sign measured against the
particles' own half-map, right in both signs on synthetic data, refused when ambiguous."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest

from hetero.data.contrast import measure_contrast
from hetero.data.datamodule import ParticleDataModule
from hetero.data.dataset import ParticleDataset, estimate_normalization
from hetero.data.io import InputError, read_particles, write_star
from hetero.data.synthetic import SyntheticDataset


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    ds = SyntheticDataset(kind="discrete", n_particles=400, box_size=32, pixel_size_angstrom=6.0,
                          n_states=2, snr=0.05, seed=1, cache_dir=str(tmp_path_factory.mktemp("syn")))
    return ds.ensure()


@pytest.mark.parametrize("invert", [False, True])
def test_measured_sign_in_both_signs(synthetic, invert):
    table = read_particles(synthetic)
    _, std = estimate_normalization(ParticleDataset(table), 200)
    check = measure_contrast(ParticleDataset(table, scale=1 / std, invert_contrast=invert))
    assert check.invert is invert
    assert abs(check.contrast) > 3 * check.margin and check.cross_cc > 3 * check.min_cross_cc


def test_datamodule_auto_decides_saves_and_refuses_noise(synthetic, tmp_path):
    split = tmp_path / "split.npz"
    dm = ParticleDataModule(synthetic, invert_contrast="auto", split_file=str(split), num_workers=0,
                            sampler="random", norm_sample_size=100)
    dm.setup("fit")
    assert dm.invert_contrast is False and dm.contrast_check.invert is False
    assert bool(np.load(split)["invert_contrast"]) is False
    again = ParticleDataModule(synthetic, invert_contrast="auto", split_file=str(split), num_workers=0,
                               sampler="random", norm_sample_size=100)
    again.setup("fit")
    assert again.invert_contrast is False and again.contrast_check is None  # reused, not remeasured
    # Pure noise with the same poses and CTF: no map, no decision.
    table = read_particles(synthetic)
    noise = np.random.default_rng(0).standard_normal((len(table), 32, 32)).astype(np.float32)
    mrcfile.write(tmp_path / "noise.mrcs", noise)
    table.image_paths[:] = str(tmp_path / "noise.mrcs")
    table.image_indices = np.arange(len(table))
    star = write_star(tmp_path / "noise.star", table)
    dm = ParticleDataModule(str(star), invert_contrast="auto", num_workers=0, sampler="random",
                            norm_sample_size=100)
    with pytest.raises(InputError, match=r"noise\.star: data\.invert_contrast=auto could not tell.*"
                       r"pass data\.invert_contrast=false .* or data\.invert_contrast=true"):
        dm.setup("fit")
    with pytest.raises(InputError, match=r"data\.invert_contrast='maybe'; expected true, false or auto"):
        ParticleDataModule(str(star), invert_contrast="maybe")
