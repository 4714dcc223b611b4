"""Helpers run in spawned test processes (a light module: spawned children import only this)."""

from __future__ import annotations

import numpy as np
import torch

from hetero.analysis.reconstruction import reconstruct_groups


def fake_batches(images, rotations, half):
    """A ``make_loader`` for :func:`reconstruct_groups` over in-memory images (CTF of 1.1-1.2 µm
    defocus at 2 Å/px, no shifts)."""

    def make(batches):
        for b in batches:
            b = np.asarray(b)
            n = len(b)
            yield {
                "image": images[b],
                "rotation": rotations[b],
                "origin_px": torch.zeros(n, 2),
                "ctf": torch.tensor([[1.2e4, 1.1e4, 10, 300, 2.7, 0.1, 0, 0, 1]]).expand(n, 9),
                "apix": torch.full((n,), 2.0),
                "index": torch.from_numpy(b),
                "half": torch.from_numpy(half[b]),
            }

    return make


def reconstruct_on_rank(rank, world, init, out, images, rotations, half, labels):
    """One rank of a gloo process group; rank 0 saves ``{group: (half1, half2, full, n_half)}``."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        maps = reconstruct_groups(
            fake_batches(images, rotations, half),
            {"c": labels},
            half,
            images.shape[-1],
            batch_size=5,
        )
        if rank == 0:
            torch.save({g.group: (g.half1, g.half2, g.full, g.n_half) for g in maps["c"]}, out)
    finally:
        torch.distributed.destroy_process_group()
