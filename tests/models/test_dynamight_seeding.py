"""Seeding of DynaMight's consensus Gaussians: random (reference) and stratified draws."""

from __future__ import annotations

import pytest
import torch

from hetero.models.dynamight import DynaMight, GaussianConsensus
from hetero.physics.gaussians import rasterize_gaussians
from hetero.utils.errors import ConfigError

BOX, APIX = 24, 4.0


def _map() -> torch.Tensor:
    truth = torch.tensor([[10.0, 0.0, -8.0], [-12.0, 6.0, 4.0], [0.0, -10.0, 10.0]])
    return rasterize_gaussians(truth, 6.0, torch.ones(3), BOX, APIX)


def _voxel_counts(c: GaussianConsensus, target: torch.Tensor, threshold: float) -> torch.Tensor:
    """Gaussians per voxel above ``threshold`` (every seed must lie in one)."""
    idx = (c.positions_angstrom().detach() / APIX).round().long() + BOX // 2
    flat = (idx[:, 2] * BOX + idx[:, 1]) * BOX + idx[:, 0]
    counts = torch.bincount(flat, minlength=BOX**3)
    above = (target > threshold).flatten()
    assert counts[~above].sum() == 0
    return counts[above]


@pytest.mark.parametrize("n_per_voxel", [0.6, 2.5])
def test_stratified_seeding_gives_every_voxel_its_share(n_per_voxel):
    target = _map()
    m = int((target > torch.quantile(target.flatten(), 0.99)).sum())
    n = int(round(n_per_voxel * m))
    strat = GaussianConsensus(n, BOX, APIX)
    threshold = strat.seed(target, generator=torch.Generator().manual_seed(0), sampling="stratified")
    counts = _voxel_counts(strat, target, threshold)
    assert int(counts.sum()) == n
    # N // M or N // M + 1 in every voxel, N mod M voxels with the extra one
    assert int(counts.min()) == n // m and int(counts.max()) == n // m + (n % m > 0)
    assert int((counts > n // m).sum()) == n % m
    # The reference's draws with replacement spread wider (Poisson: empty voxels, crowded ones)
    rand = GaussianConsensus(n, BOX, APIX)
    rand.seed(target, generator=torch.Generator().manual_seed(0), sampling="random")
    counts = _voxel_counts(rand, target, threshold)
    assert int(counts.sum()) == n and int(counts.max() - counts.min()) > 1


def test_unknown_sampling_is_refused():
    with pytest.raises(ValueError, match="stratified"):
        GaussianConsensus(10, BOX, APIX).seed(_map(), sampling="uniform")
    with pytest.raises(ConfigError, match="model.initial_sampling must be random or stratified"):
        DynaMight(BOX, APIX, n_gaussians=10, initial_sampling="uniform")


def test_model_initial_sampling_reaches_the_seeding(tmp_path, monkeypatch):
    """``model.initial_sampling`` is what both half sets' consensus seeding uses."""
    from hetero.data.io.mrc import write_volume
    from hetero.models.dynamight.initialization import initialize_consensus

    path = tmp_path / "consensus.mrc"
    write_volume(path, _map().numpy(), APIX)
    seen = []
    seed = GaussianConsensus.seed

    def spy(self, *args, **kwargs):
        seen.append(args[4] if len(args) > 4 else kwargs.get("sampling"))
        return seed(self, *args, **kwargs)

    monkeypatch.setattr(GaussianConsensus, "seed", spy)
    for sampling in ("stratified", "random"):
        seen.clear()
        m = DynaMight(BOX, APIX, n_gaussians=40, zdim=2, consensus_map=str(path), fit_steps=0,
                      initial_sampling=sampling)
        initialize_consensus(m)
        assert seen == [sampling, sampling]
