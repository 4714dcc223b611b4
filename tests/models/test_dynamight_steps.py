"""DynaMight's analysis steps on a fake analysis context (the shape of
``hetero.analysis.context.AnalysisContext``): files, metrics, and a half-set error that is
exactly zero for identical halves and equals the displacement when one half doubles it."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from hetero.analysis import latent as L
from hetero.models.dynamight import DynaMight
from hetero.models.dynamight import steps as S
from tests.helpers import FakeAnalysisContext

FakeContext = FakeAnalysisContext


def _model() -> DynaMight:
    torch.manual_seed(0)
    m = DynaMight(box_size=20, apix=4.0, n_gaussians=30, n_particles=40, zdim=3, decoder_layers=2,
                  decoder_width=8, encoder_hidden=[16, 8])
    with torch.no_grad():
        m.halves[0].consensus.positions.copy_((torch.rand(30, 3) - 0.5) * 0.5)
        torch.nn.init.normal_(m.halves[0].decoder.out.weight, std=0.3)
    m.halves[1] = copy.deepcopy(m.halves[0])
    return m.eval()


def _context(tmp_path, model, z, validation) -> FakeContext:
    n = len(z)
    pp = {"z_mu_half1": z, "z_mu_half2": z.copy(), "validation": validation,
          "deformation_rmsd": np.linspace(1, 3, n), "deformation_max": np.linspace(2, 9, n)}
    result = SimpleNamespace(extras={"model": model}, per_particle=pp, embedding=z, embedding_dim=z.shape[1])
    cfg = OmegaConf.create({"n_pc_traversals": 1, "pc_traversal": {"steps": 4}, "maps": {"batch_size": 4}})
    pcs = L.pca(z, 2)
    return FakeContext(cfg=cfg, out=tmp_path, files=[], metrics={}, sections={}, result=result,
                       state={"pca": pcs, "clusters": L.kmeans(z, 3, seed=0)}, box=40, apix=2.0)


def test_steps_write_their_outputs(tmp_path):
    model = _model()
    z = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    ctx = _context(tmp_path, model, z, np.arange(40) % 4 == 0)
    S.pseudo_atoms(ctx)
    S.deformations(ctx)
    S.half_set_error(ctx)
    out = tmp_path / "dynamight"
    for name in ("consensus_half1.cmm", "consensus_half2.pdb", "consensus_half1.mrc", "clusters.npz",
                 "displacements/pc1.npz", "displacements/pc2.cmm", "markers/pc1/pc1.cxc",
                 "half_set_error/disagreement.cxc", "half_set_error/disagreement.mrc"):
        assert (out / name).is_file(), name
    assert all(Path(f).is_file() for f in ctx.files)
    dm = ctx.metrics["dynamight"]
    assert dm["deformation"]["max_rmsd"] == pytest.approx(3.0)
    assert dm["deformation"]["max_displacement"] == pytest.approx(9.0)
    assert len(dm["cluster_rmsd"]) == 3 and dm["pc_displacement_mean"][0] > 0
    # Identical half sets: the disagreement is exactly zero on all 10 validation particles.
    err = dm["half_set_error"]
    assert err["validation_particles"] == 10 and err["max"] == 0.0 and err["mean_displacement"] > 0
    # The consensus map written for ChimeraX is the rasterised consensus at the original grid.
    assert any("DynaMight" in k for k in ctx.sections)


def test_half_set_error_measures_the_difference_of_the_fields(tmp_path):
    model = _model()
    with torch.no_grad():
        model.halves[1].decoder.out.weight.mul_(2.0)  # half 2 moves every Gaussian twice as far
    z = np.random.default_rng(1).normal(size=(40, 3)).astype(np.float32)
    ctx = _context(tmp_path, model, z, np.ones(40, dtype=bool))
    S.half_set_error(ctx)
    res = np.load(tmp_path / "dynamight" / "half_set_error" / "disagreement.npz")
    # |d2 - d1| = |d1|, and the mean of the halves' RMS displacement is 1.5 |d1|.
    np.testing.assert_allclose(res["rms_difference"], res["rms_displacement"] / 1.5, rtol=1e-4)
    assert (tmp_path / "figures" / "dynamight_half_set_error.png").is_file()
