"""Helpers run in spawned test processes for the deformed backprojection (a light module)."""

from __future__ import annotations

import torch

from hetero.models.dynamight.backprojection import make_regions, reconstruct_half_maps
from hetero.models.dynamight.backprojection_step import backproject_halves
from tests.analysis.dist_worker import fake_batches


class ShiftDeformer:
    """Consensus points on a line; particle ``i`` moves the points with x > 0 by ``i % 5`` Å
    along y (a different rigid motion per region)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.rest = torch.randn(60, 3, generator=g) * 6.0

    def __call__(self, index):
        idx = torch.as_tensor(index)
        out = self.rest.expand(len(idx), -1, -1).clone()
        move = (self.rest[:, 0] > 0).float()[None, :] * (idx % 5).float()[:, None]
        out[..., 1] += move
        return out


def deformed_maps(images, rotations, half, batch_size: int = 5):
    d = ShiftDeformer()
    regions = make_regions(d.rest, 2)
    sums = backproject_halves(fake_batches(images, rotations, half), half, [d, d], [regions, regions],
                              images.shape[-1], batch_size)
    w = regions.weights(images.shape[-1], 2.0)
    return reconstruct_half_maps(sums["deformed"], w), sums["deformed"][0].count


def backproject_on_rank(rank, world, init, out, images, rotations, half):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        maps, count = deformed_maps(images, rotations, half)
        if rank == 0:
            torch.save({"half1": maps["half1"], "half2": maps["half2"], "count": count}, out)
    finally:
        torch.distributed.destroy_process_group()
