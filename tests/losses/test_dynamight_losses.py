"""DynaMight's loss pieces: the radius graph and geometric regulariser, the gradient-norm
balancing of lambda on a hand-made case, and the whitened Fourier data term."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hetero.losses.geometric import (
    GeometricRegularization,
    balanced_weight,
    gradient_norm,
    radius_graph,
)
from hetero.losses.whitening import (
    hermitian_weights,
    radial_mean_rfft,
    rfft_shell_index,
    whitened_squared_error,
    whitening_weights,
)
from hetero.physics.rotations import random_rotations


def _lattice(n: int = 4, spacing: float = 3.0) -> torch.Tensor:
    a = torch.arange(n, dtype=torch.float32) * spacing
    return torch.stack(torch.meshgrid(a, a, a, indexing="ij"), -1).reshape(-1, 3)


def test_radius_graph_of_a_cubic_lattice():
    """Two nearest neighbours at 3 Å -> radius 4.5 Å: the 6 axis neighbours and the 12 face
    diagonals (4.24 Å), not the body diagonals (5.2 Å); both directions present."""
    pos = _lattice()
    g = radius_graph(pos)
    assert g.mean_neighbour_distance == pytest.approx(3.0)
    lengths = g.rest_lengths.numpy()
    assert set(np.round(lengths.astype(np.float64), 2).tolist()) == {3.0, 4.24}
    pairs = {tuple(e) for e in g.edges.tolist()}
    assert all((j, i) in pairs for i, j in pairs)
    centre = 1 * 16 + 1 * 4 + 1  # an interior point has 6 + 12 neighbours
    assert int((g.edges[:, 0] == centre).sum()) == 18
    assert g.cutoff == pytest.approx(float(lengths.mean()))


def test_geometric_regularisation_is_zero_for_rigid_motions_and_counts_stretch():
    pos = _lattice()
    reg = GeometricRegularization()
    g = reg.graph(pos)
    rot = random_rotations(2, torch.Generator().manual_seed(0)).float()
    rigid = pos @ rot.transpose(1, 2) + torch.tensor([5.0, -2.0, 1.0])
    out = reg(rigid, g)
    assert float(out["distance"]) == pytest.approx(0.0, abs=1e-8)
    # The too-close term is the reference's: it already counts consensus edges below the mean.
    base = float(torch.relu(g.cutoff - g.rest_lengths).mean())
    assert float(out["too_close"]) == pytest.approx(base, rel=1e-5)
    stretched = pos[None] * 1.1
    d = float(reg(stretched, g)["distance"])
    assert d == pytest.approx(float(((0.1 * g.rest_lengths) ** 2).mean()), rel=1e-5)


def test_balanced_weight_is_the_gradient_norm_ratio_on_a_hand_made_case():
    """theta in R^3; L_data = |A theta - b|^2, R = |C theta|^2 with known gradients."""
    theta = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    A = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
    b = torch.tensor([1.0, 0.5])
    C = torch.diag(torch.tensor([3.0, 0.1, 1.0]))
    data = ((A @ theta - b) ** 2).sum()
    geo = ((C @ theta) ** 2).sum()
    g_data = gradient_norm(data, [theta])
    g_geo = gradient_norm(geo, [theta])
    with torch.no_grad():
        expect_data = torch.linalg.norm(2 * A.T @ (A @ theta - b))
        expect_geo = torch.linalg.norm(2 * C.T @ C @ theta)
    assert float(g_data) == pytest.approx(float(expect_data), rel=1e-6)
    assert float(g_geo) == pytest.approx(float(expect_geo), rel=1e-6)
    lam = balanced_weight(g_data, g_geo, factor=0.9)
    assert lam == pytest.approx(0.9 * float(expect_data / expect_geo), rel=1e-6)
    # The floor: a vanishing regulariser gradient caps lambda at factor / floor.
    assert balanced_weight(2.0, 0.0, factor=0.9, floor=5e-4) == pytest.approx(0.9 / 5e-4)
    assert balanced_weight(0.0, 1.0) == 0.0
    # Parameters without a path to the loss count zero.
    other = torch.zeros(2, requires_grad=True)
    assert float(gradient_norm(data, [theta, other])) == pytest.approx(float(expect_data), rel=1e-6)


def test_unwhitened_fourier_error_is_the_pixel_mse():
    for d in (16, 15):
        g = torch.Generator().manual_seed(d)
        x, y = torch.randn(3, d, d, generator=g), torch.randn(3, d, d, generator=g)
        fx, fy = torch.fft.rfft2(x), torch.fft.rfft2(y)
        np.testing.assert_allclose(whitened_squared_error(fx, fy, d).numpy(),
                                   ((x - y) ** 2).mean((-2, -1)).numpy(), rtol=1e-5)


def test_whitening_weights_and_radial_means():
    d = 24
    shells = rfft_shell_index(d)
    const = torch.full((2, d, d // 2 + 1), 3.0)
    np.testing.assert_allclose(radial_mean_rfft(const, shells, d // 2 + 1).numpy(), 3.0, rtol=1e-6)
    noise = torch.linspace(1.0, 4.0, d // 2 + 1)
    w = whitening_weights(noise, d)
    h = hermitian_weights(d)
    assert float((h * w * w).sum()) == pytest.approx(d * d, rel=1e-5)
    # W is proportional to 1 / Sigma inside Nyquist and zero outside.
    inside = shells <= d // 2
    ratio = (w * noise[shells.clamp(max=d // 2)])[inside]
    assert float(ratio.std() / ratio.mean()) < 1e-5
    assert float(w[~inside].abs().max()) == 0.0
    assert math.isclose(float(w[0, 0]) * 1.0, float(ratio.mean()), rel_tol=1e-5)
