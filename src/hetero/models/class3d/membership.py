"""Which particles each of the ``U`` classifications of one run uses.

``model=class3d`` runs ``U`` independent classifications ("replicates") in one pass over the
data. Their particle subsets are a boolean membership matrix ``(N, U)`` (``N`` = particles of
the input, in input order; ``True`` = the particle belongs to that replicate), the only
per-particle state the run keeps besides the last class of each (particle, replicate): memory
``N * U`` bytes each. Every particle contributes only to the replicates that contain it, and
gets posteriors only for those (a particle in none of them keeps empty rows and class -1).

Subsets can be given as (:func:`build_membership`):

- nothing: ``n_replicates`` copies of the whole particle set (e.g. runs with different seeds);
- a boolean ``(N, U)`` array, or a sequence of ``U`` arrays of 0-based particle indices;
- a path to a ``.npy`` file holding a boolean ``(N, U)`` array, or to a ``.npz`` file with
  either a boolean ``membership`` array or one integer index array per replicate (sorted by
  key name).

:func:`leave_one_group_out` builds AlphaCryo4D's M-fold particle shuffling (paper Fig. 1B):
``M + 1`` random groups and ``M + 1`` subsets that each leave one group out, so that every
particle lies in exactly ``M`` of them.

Example usage::

    member = build_membership(n_particles=5000, subsets=leave_one_group_out(5000, 4, seed=0))
    member.shape                     # (5000, 4), each row has three True
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def build_membership(
    n_particles: int, n_replicates: int = 1, subsets=None
) -> Tensor:
    """The ``(N, U)`` boolean membership matrix of a run.

    :param n_particles: ``N``.
    :param n_replicates: ``U`` when ``subsets`` is ``None`` (every particle in every replicate);
        with ``subsets`` it must be 1 (the default) or equal the number of subsets.
    :param subsets: see the module docstring.
    :raises ValueError: naming the offending subset (out-of-range or repeated indices, an empty
        subset, a shape that does not match ``N``).
    :raises FileNotFoundError: for a missing subsets file.
    """
    n = int(n_particles)
    if subsets is None:
        u = int(n_replicates)
        if u < 1:
            raise ValueError(f"model.n_replicates must be >= 1, got {n_replicates}")
        return torch.ones(n, u, dtype=torch.bool)
    if isinstance(subsets, str | Path):
        subsets = _read_subsets(Path(subsets), n)
    if isinstance(subsets, Tensor):
        subsets = subsets.detach().cpu().numpy()
    if isinstance(subsets, np.ndarray) and subsets.dtype == np.bool_:
        member = torch.from_numpy(subsets.copy())
        if member.dim() != 2 or member.shape[0] != n:
            raise ValueError(
                f"model.subsets: a boolean membership matrix must be (N, U) = ({n}, U), "
                f"got {tuple(member.shape)}"
            )
    else:
        member = _from_index_lists(subsets, n)
    u = member.shape[1]
    if int(n_replicates) not in (1, u):
        raise ValueError(
            f"model.n_replicates={n_replicates} but model.subsets gives {u} subsets: "
            "leave n_replicates at 1 or set it to the number of subsets"
        )
    empty = torch.nonzero(member.sum(0) == 0).flatten().tolist()
    if empty:
        raise ValueError(f"model.subsets: subsets {empty} are empty (0 particles)")
    return member.contiguous()


def _from_index_lists(subsets: Sequence, n: int) -> Tensor:
    if len(subsets) == 0:
        raise ValueError("model.subsets is an empty list: give at least one subset")
    member = torch.zeros(n, len(subsets), dtype=torch.bool)
    for j, sub in enumerate(subsets):
        idx = np.asarray(sub)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(
                f"model.subsets[{j}]: expected a 1-D array of integer particle indices, got "
                f"dtype {idx.dtype} and shape {idx.shape}"
            )
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(
                f"model.subsets[{j}]: indices must lie in 0..{n - 1} (0-based rows of the "
                f"input), got {int(idx.min())}..{int(idx.max())}"
            )
        if np.unique(idx).size != idx.size:
            raise ValueError(f"model.subsets[{j}]: repeated particle indices")
        member[torch.from_numpy(idx.astype(np.int64)), j] = True
    return member


def _read_subsets(path: Path, n: int):
    if not path.is_file():
        raise FileNotFoundError(f"model.subsets: no file at {path}")
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.dtype != np.bool_:
            raise ValueError(f"{path}: expected a boolean (N, U) membership matrix, got {arr.dtype}")
        return arr
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            if "membership" in f.files:
                return f["membership"].astype(bool)
            return [f[k] for k in sorted(f.files)]
    raise ValueError(f"model.subsets: {path} must be a .npy or .npz file (see hetero.models.class3d.membership)")


def leave_one_group_out(n_particles: int, n_groups: int, seed: int = 0) -> Tensor:
    """AlphaCryo4D's M-fold shuffling: ``(N, n_groups)`` membership, ``n_groups = M + 1``.

    The particles are randomly permuted (seeded) and cut into ``n_groups`` groups of equal size
    (the first ``N mod n_groups`` groups one larger; the reference drops that remainder);
    subset ``j`` holds every group but ``j``, so each particle is in exactly ``M`` subsets.
    """
    g = int(n_groups)
    if g < 2:
        raise ValueError(f"n_groups must be >= 2, got {n_groups}")
    perm = np.random.default_rng(int(seed)).permutation(int(n_particles))
    group = np.empty(int(n_particles), dtype=np.int64)
    for j, part in enumerate(np.array_split(perm, g)):
        group[part] = j
    member = torch.ones(int(n_particles), g, dtype=torch.bool)
    member[torch.arange(int(n_particles)), torch.from_numpy(group)] = False
    return member


def random_classes(index: Tensor, seed: int, n_classes: int) -> Tensor:
    """A seeded pseudo-random class ``0..K-1`` per particle index (splitmix64 of index + seed).

    Depends only on ``(seed, index)``: the same particle gets the same class whatever its batch,
    its rank under DDP or the other particles of its subset, so a replicate seeded like a
    separate run reproduces that run. ``index``: ``(B,)`` long; returns ``(B,)`` long.
    """
    x = index.detach().cpu().numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        z = x + np.uint64((int(seed) * 0x9E3779B97F4A7C15) % 2**64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z % np.uint64(n_classes)).astype(np.int64)).to(index.device)
