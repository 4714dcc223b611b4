"""DynaMight part 2: the exact inverse of a displacement field and the deformed weighted
backprojection (hetero.models.dynamight.inverse / .backprojection), on analytic fields and
Gaussian pseudo-atom particles rendered with the model's own projector."""

from __future__ import annotations

import math

import torch

from hetero.models.dynamight.backprojection import (
    DeformedBackprojection,
    local_rigid_transforms,
    make_regions,
    reconstruct_half_maps,
)
from hetero.models.dynamight.inverse import (
    consensus_consistency,
    grid_points,
    inverse_consistency,
    iterative_inverse,
)
from hetero.physics.fsc import fsc
from hetero.physics.gaussians import project_gaussians, rasterize_gaussians
from hetero.physics.reconstruction import BackprojectionAccumulator
from hetero.physics.rotations import random_rotations
from tests.helpers import one_torch_thread_autouse  # noqa: F401 (autouse fixture)

D, APIX = 32, 4.0


def smooth_field(points: torch.Tensor) -> torch.Tensor:
    """An analytic smooth field (px): a sinusoidal swirl plus a rotation of 10 degrees about z
    fading with distance; Lipschitz constant ~0.5."""
    x, y, z = points.unbind(-1)
    a = 2.0  # px
    d = torch.stack([a * torch.sin(2 * math.pi * y / 24), a * torch.cos(2 * math.pi * z / 20),
                     a * torch.sin(2 * math.pi * x / 28)], -1)
    fade = torch.exp(-(x**2 + y**2 + z**2) / (2 * 10.0**2))
    ang = math.radians(10.0)
    rot = torch.stack([x * (math.cos(ang) - 1) - y * math.sin(ang),
                       x * math.sin(ang) + y * (math.cos(ang) - 1), torch.zeros_like(z)], -1)
    return d + fade[..., None] * rot


def test_iterative_inverse_recovers_a_smooth_analytic_field():
    g = torch.Generator().manual_seed(0)
    x_true = (torch.rand(2, 4000, 3, generator=g, dtype=torch.float64) - 0.5) * 30  # px
    y = x_true + smooth_field(x_true)
    x, residual = iterative_inverse(smooth_field, y, max_iter=100, tol=1e-8)
    err = (x - x_true).norm(dim=-1)
    assert float(err.max()) < 0.1, float(err.max())      # the bound (px)
    assert float(err.max()) < 1e-5                        # it is in fact exact
    assert float(residual.max()) < 1e-5
    # Consistency measures, both ways, over a grid and over "consensus" points.
    inv = lambda p: iterative_inverse(smooth_field, p, 100, 1e-8)[0]  # noqa: E731
    grid = grid_points(16, 2.0)[None].double()
    assert float(inverse_consistency(smooth_field, inv, grid).max()) < 1e-5
    assert float(consensus_consistency(smooth_field, inv, x_true).max()) < 1e-5
    # A naive inverse (-d(y)) is off by far more: the test can fail.
    naive = (y - smooth_field(y) - x_true).norm(dim=-1)
    assert float(naive.max()) > 0.5


def test_local_rigid_transforms_recover_rigid_motions():
    g = torch.Generator().manual_seed(1)
    rest = torch.randn(300, 3, generator=g) * 20
    assign = (rest[:, 0] > 0).long()
    rot = random_rotations(2, generator=g).float()
    shift = torch.tensor([[3.0, -2.0, 1.0], [-4.0, 0.5, 2.0]])
    deformed = torch.where(assign[:, None] == 0, rest @ rot[0].T + shift[0], rest @ rot[1].T + shift[1])[None]
    q, s = local_rigid_transforms(rest, deformed, assign, 2)
    torch.testing.assert_close(q[0], rot, atol=1e-5, rtol=0)
    torch.testing.assert_close(s[0], shift, atol=1e-3, rtol=0)


def _particles(n: int, deform, seed: int = 0):
    """Gaussian pseudo-atoms (a 'core' at x < 0 and an 'arm' at x > 0), images at random poses
    (no CTF, no noise) of the atoms moved by ``deform(points, i)``."""
    g = torch.Generator().manual_seed(seed)
    rest = torch.cat([torch.randn(150, 3, generator=g) * torch.tensor([8.0, 12.0, 12.0]) + torch.tensor([-14.0, 0, 0]),
                      torch.randn(150, 3, generator=g) * torch.tensor([10.0, 6.0, 6.0]) + torch.tensor([18.0, 0, 0])])
    rot = random_rotations(n, generator=g).float()
    deformed = torch.stack([deform(rest, i) for i in range(n)])
    sigma, amp = torch.full((300,), 4.0), torch.ones(300)
    images = project_gaussians(deformed, sigma, amp, rot, D, APIX)
    truth = rasterize_gaussians(rest, sigma, amp, D, APIX)
    return rest, deformed, rot, images, truth


def _reconstruct(rest, deformed, rot, images, n_regions, motion=True):
    regions = make_regions(rest, n_regions)
    halves = []
    for h in (0, 1):
        sel = torch.arange(h, len(images), 2)
        bp = DeformedBackprojection(D, n_regions, dtype=torch.float64)
        if motion:
            q, s = local_rigid_transforms(rest, deformed[sel], regions.assignment, n_regions)
            bp.add(images[sel], rot[sel], None, None, q, s / APIX)
        else:
            bp.add(images[sel], rot[sel], None, None)
        halves.append(bp)
    return reconstruct_half_maps(halves, regions.weights(D, APIX))


def test_zero_deformation_equals_the_rigid_backprojection():
    rest, deformed, rot, images, _ = _particles(60, lambda p, i: p)
    deformed_maps = _reconstruct(rest, deformed, rot, images, 4)
    rigid = _reconstruct(rest, deformed, rot, images, 1, motion=False)
    for k in ("half1", "half2"):
        scale = float(rigid[k].abs().max())
        assert float((deformed_maps[k] - rigid[k]).abs().max()) <= 1e-5 * scale
    # The rigid path is the physics' BackprojectionAccumulator, inserted exactly as it is.
    acc = BackprojectionAccumulator(D, dtype=torch.float64)
    acc.add(images[0::2], rot[0::2])
    bp = DeformedBackprojection(D, 1, dtype=torch.float64)
    bp.add(images[0::2], rot[0::2], None, None)
    assert torch.equal(acc.numerator, bp.accumulators[0].numerator)


def _arm_motion(n):
    angles = torch.linspace(-25, 25, n)

    def deform(p, i):
        a = math.radians(float(angles[i]))
        r = torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1.0]])
        hinge = torch.tensor([4.0, 0, 0])
        moved = (p - hinge) @ r.T + hinge
        return torch.where(p[:, :1] > 4.0, moved, p)

    return deform


def test_deformed_backprojection_undoes_a_hinge_motion():
    """Particles whose arm swings by +-25 degrees: the deformed backprojection (2 regions, the
    true motion) reconstructs the rest structure far better than the rigid one."""
    n = 80
    rest, deformed, rot, images, truth = _particles(n, _arm_motion(n))
    dmaps = _reconstruct(rest, deformed, rot, images, 2)
    rmaps = _reconstruct(rest, deformed, rot, images, 1, motion=False)
    arm = torch.zeros(D, D, D)
    arm[:, :, D // 2 + 2:] = 1.0   # x > 8 Å
    f_def = fsc(dmaps["half1"] + dmaps["half2"], truth, arm)
    f_rig = fsc(rmaps["half1"] + rmaps["half2"], truth, arm)
    hi = slice(6, 14)
    assert float(f_def[hi].mean()) > float(f_rig[hi].mean()) + 0.1, (f_def, f_rig)
    assert float(f_def[hi].mean()) > 0.9, f_def


def test_two_processes_give_the_maps_of_one(tmp_path):
    """Under torch.distributed (2 gloo processes) each rank accumulates every other batch and the
    sums are all-reduced: the same half maps as one process."""
    import numpy as np

    from tests.models.dynamight_dist_worker import backproject_on_rank, deformed_maps

    n, d = 40, 12
    gen = torch.Generator().manual_seed(3)
    images, rot = torch.randn(n, d, d, generator=gen), random_rotations(n, generator=gen).float()
    half = np.arange(n) % 2
    single, count = deformed_maps(images, rot, half)
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(backproject_on_rank, nprocs=2, join=True,
                                args=(2, f"file://{tmp_path / 'rendezvous'}", str(out), images, rot, half))
    multi = torch.load(out, weights_only=True)
    assert multi["count"] == count == 20
    for k in ("half1", "half2"):
        assert torch.allclose(multi[k], single[k], atol=1e-5 * float(single[k].abs().max()))
