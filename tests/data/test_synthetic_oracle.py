"""The oracle classifier of the synthetic datasets (the ceiling the benchmarks quote)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetero.data.io.mrc import ImageStack
from hetero.data.synthetic import SyntheticDataset
from hetero.data.synthetic.oracle import oracle_assignment

SMALL = dict(n_particles=96, box_size=32, pixel_size_angstrom=5.0, seed=4)


def _dataset(tmp_path, **kw) -> SyntheticDataset:
    ds = SyntheticDataset(**{**SMALL, **kw}, cache_dir=str(tmp_path))
    ds.ensure()
    return ds


def test_noiseless_discrete_and_compositional_are_recovered_exactly(tmp_path):
    for kind in ("discrete", "compositional"):
        result = oracle_assignment(_dataset(tmp_path, kind=kind, snr=None), chunk_size=40)
        np.testing.assert_array_equal(result["labels"], result["true_labels"])
        assert result["ari"] == pytest.approx(1.0) and result["accuracy"] == 1.0


def test_noiseless_continuous_recovers_t(tmp_path):
    ds = _dataset(tmp_path, kind="continuous", snr=None, n_particles=48)
    result = oracle_assignment(ds)
    truth = np.load(f"{ds.truth_dir}/truth.npz")
    # grid resolution: coarse step 1/32, fine step 1/128
    assert result["t_rmse"] < 0.01, result["t_rmse"]
    assert np.abs(result["t"] - truth["t"]).max() < 0.02
    assert result["t_pearson"] > 0.999


def test_true_state_residual_is_the_noise(tmp_path):
    """The oracle's model reproduces the data: image - s * clean(true state) is unit white noise,
    so its likelihood is the correct one (a wrong scale, CTF or shift would inflate this)."""
    ds = _dataset(tmp_path, kind="discrete", snr=0.1)
    truth = dict(np.load(f"{ds.truth_dir}/truth.npz"))
    idx = np.arange(ds.n_particles)
    clean, _ = ds.clean_images(truth, idx)
    images = torch.from_numpy(ImageStack(f"{ds.truth_dir}/particles.mrcs").read(idx))
    residual = images - float(truth["image_scale"]) * clean
    assert residual.var().item() == pytest.approx(1.0, abs=0.02)
    assert residual.mean().abs().item() < 0.01


def test_oracle_degrades_with_noise_and_beats_chance(tmp_path):
    high = oracle_assignment(_dataset(tmp_path, kind="discrete", snr=0.5))
    low = oracle_assignment(_dataset(tmp_path, kind="discrete", snr=0.02))
    assert high["accuracy"] > 0.95
    assert low["accuracy"] < high["accuracy"]
    assert 0.25 < low["accuracy"] < 0.95  # noisy, but well above guessing among 8 states
