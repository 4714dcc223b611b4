"""Random generators in checkpoints: a resumed run continues the same random streams.

Models draw random numbers every step (OPUS-DSD: the reparameterised latent sample, the
augmentation's B-factors and contrast, random neighbour poses). Lightning does not save the
generators' states, so after a resume those draws differ from an uninterrupted run's and
resuming is not reproducible. :class:`RandomStateCheckpoint` stores, for every rank, the
states of torch's CPU generator, the CUDA generators, numpy's global generator and Python's
``random`` in each checkpoint (as plain tensors: checkpoints still load with
``torch.load(weights_only=True)``), and restores its own rank's on resume.

Together with seeded per-epoch batch samplers and
:class:`~hetero.data.loader.ResumableDataLoader`, a run resumed from any checkpoint
``last.ckpt`` holds ends with the same weights as an uninterrupted run (same seed, deterministic
CPU; ``tests/tasks/test_resume.py``).
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch

__all__ = ["RandomStateCheckpoint", "get_random_state", "set_random_state"]

KEY = "hetero_random_state"


def get_random_state() -> dict[str, torch.Tensor]:
    """This process' generator states as tensors (see module docstring)."""
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (the global generator Lightning code may use)
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_ints": torch.tensor([int(pos), int(has_gauss)], dtype=torch.int64),
        "numpy_gauss": torch.tensor([float(cached)], dtype=torch.float64),
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_random_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`get_random_state` returned."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    keys = state["numpy_keys"].cpu().numpy().astype(np.uint32)
    pos, has_gauss = (int(v) for v in state["numpy_ints"].tolist())
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy_gauss"][0])))  # noqa: NPY002
    gauss = float(state["python_gauss"][0])
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None if np.isnan(gauss) else gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"].cpu().to(torch.uint8)
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(list(cuda))


class RandomStateCheckpoint(L.Callback):
    """Saves every rank's generator states in checkpoints and restores them on resume."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        state = get_random_state()
        if trainer.world_size > 1:
            # trainer.save_checkpoint runs on every rank: gather each rank's state.
            device = pl_module.device
            state = {
                k: trainer.strategy.all_gather(v.to(device)).cpu().reshape(trainer.world_size, *v.shape)
                for k, v in state.items()
            }
        else:
            state = {k: v[None] for k, v in state.items()}
        checkpoint[KEY] = state

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        state = checkpoint.get(KEY)
        if not state:
            return
        ranks = len(state["torch"])
        rank = trainer.global_rank if trainer.global_rank < ranks else 0
        set_random_state({k: v[rank] for k, v in state.items()})
