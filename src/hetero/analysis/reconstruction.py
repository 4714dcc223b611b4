"""Half maps of groups of particles (clusters, method states, ...) from the particle images.

For every group of every *labeling* (an ``(N,)`` int array, ``-1`` = not in any group) the
images of the group's particles are backprojected with their consensus poses, shifts and CTF
(:class:`hetero.physics.reconstruction.BackprojectionAccumulator`, CTF evaluated on
``acc.ctf_size``), one accumulator per half set, at the images' own (original) box and pixel
size. All groups of all labelings are accumulated in ONE pass over the data: batches are
planned so that every particle of a batch shares its group in every labeling and its half set
(its *key*), and consecutive batches of one key are inserted into a scratch accumulator that
is then added to the key's group accumulators, so each image is backprojected once however
many labelings there are. Memory is ``(2 x groups + 1) x accumulator`` whatever the particle
count; when that exceeds ``max_memory_bytes`` the groups are split over several passes (logged).

Under ``torch.distributed`` (initialised by the caller, e.g. ``torchrun``) every rank
accumulates every ``world_size``-th batch and the sums are all-reduced before the maps are
computed, so every rank ends with the same maps as a single process.

Example usage::

    maps = reconstruct_groups(
        lambda batches: dm.predict_dataloader(original_size=True, batches=batches),
        {"clusters": km.labels, "consensus": np.zeros(n, int)}, dm.table.half_set, box_size=128,
    )
    maps["clusters"][3].half1          # (128, 128, 128) float32
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from hetero.physics.ctf import ctf_table_compute
from hetero.physics.reconstruction import BackprojectionAccumulator
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)


@dataclass
class GroupMaps:
    """The reconstruction of one group.

    :param name: ``"<labeling>/<group>"``-style display name set by the caller's naming.
    :param group: the group's label in its labeling.
    :param n_half: particles in half set 1 and half set 2.
    :param half1, half2, full: ``(D, D, D)`` float32 CPU maps (``full`` from both halves).
    """

    labeling: str
    group: int
    n_half: tuple[int, int]
    half1: Tensor
    half2: Tensor
    full: Tensor

    @property
    def n_particles(self) -> int:
        return int(sum(self.n_half))


def accumulator_bytes(box_size: int, pad_factor: int, dtype: torch.dtype) -> int:
    """Memory of one :class:`BackprojectionAccumulator` (complex numerator + real weights)."""
    real = torch.finfo(dtype).bits // 8
    return (pad_factor * box_size) ** 3 * 3 * real


def plan_batches(keys: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches of particle indices whose rows of ``keys`` ``(N, L)`` are identical.

    Rows with every entry but the last (the half set) negative are left out. Within a key,
    particles keep input order; batches hold at most ``batch_size`` particles.
    """
    keys = np.asarray(keys, dtype=np.int64)
    member = (keys[:, :-1] >= 0).any(axis=1)
    idx = np.flatnonzero(member)
    if idx.size == 0:
        return []
    _, inverse = np.unique(keys[idx], axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.lexsort((idx, inverse))
    idx, inverse = idx[order], inverse[order]
    starts = np.flatnonzero(np.r_[True, inverse[1:] != inverse[:-1]])
    ends = np.r_[starts[1:], len(idx)]
    batches = []
    for s, e in zip(starts, ends):
        batches += [idx[b : min(b + batch_size, e)] for b in range(s, e, batch_size)]
    return batches


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce(acc: BackprojectionAccumulator) -> None:
    import torch.distributed as dist

    dist.all_reduce(torch.view_as_real(acc.numerator))
    dist.all_reduce(acc.weight)
    count = torch.tensor([float(acc.count)], dtype=torch.float64, device=acc.weight.device)
    dist.all_reduce(count)
    acc.count = int(count.item())


def _passes(
    groups: list[tuple[str, int]], per_group: int, budget: int | None
) -> list[list[tuple[str, int]]]:
    if not budget or per_group * len(groups) <= budget:
        return [groups]
    per_pass = max(1, int(budget // per_group))
    passes = [groups[i : i + per_pass] for i in range(0, len(groups), per_pass)]
    log.warning(
        f"{len(groups)} groups x 2 half sets need {per_group * len(groups) / 2**30:.2f} GiB of "
        f"accumulators, more than the {budget / 2**30:.2f} GiB allowed: {len(passes)} passes over "
        "the data (raise reconstruction.max_memory_gb, or lower reconstruction.pad_factor)"
    )
    return passes


def reconstruct_groups(
    make_loader: Callable[[list[np.ndarray]], Iterable[Mapping[str, Tensor]]],
    labelings: Mapping[str, np.ndarray],
    half_sets: np.ndarray,
    box_size: int,
    batch_size: int = 64,
    pad_factor: int = 2,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    wiener_snr: float = 1.0,
    max_memory_bytes: int | None = None,
    progress=None,
    preweight_iterations: int = 10,
) -> dict[str, list[GroupMaps]]:
    """Half maps and full map of every group of every labeling (see the module docstring).

    :param make_loader: ``batches -> iterable of particle batches`` (the batch contract of
        :mod:`hetero.data.particles` at the *original* box: ``image``, ``rotation``,
        ``origin_px``, ``ctf``, ``apix``, ``index``, ``half``), loading exactly those index
        arrays in that order, e.g. ``dm.predict_dataloader(original_size=True, batches=...)``.
    :param labelings: ``{name: (N,) int}``; group ``g`` = particles labelled ``g``; ``-1`` = none.
    :param half_sets: ``(N,)`` half set (0 or 1) of each particle.
    :param box_size: side ``D`` of the images and maps (pixels).
    :param wiener_snr: constant Wiener regulariser of
        :meth:`BackprojectionAccumulator.reconstruct`: ``1 / wiener_snr`` is added to the
        CTF^2 weights (1: the weight of one particle at CTF = 1); ``inf`` for none.
    :param max_memory_bytes: accumulator memory allowed at once (``None``: unlimited).
    :param progress: optional :class:`rich.progress.Progress`.
    :param preweight_iterations: iterations of RELION's density compensation in each map's
        reconstruction (RELION: 10; each costs two FFTs of the padded grid, about half the time
        of a map: fewer trade accuracy for speed on many or large groups).
    :return: ``{labeling: [GroupMaps for group 0 .. max label]}``.
    """
    half_sets = np.asarray(half_sets, dtype=np.int64).reshape(-1)
    n = len(half_sets)
    labels = {k: np.asarray(v, dtype=np.int64).reshape(-1) for k, v in labelings.items()}
    for name, lab in labels.items():
        if len(lab) != n:
            raise ValueError(f"labeling {name!r} has {len(lab)} entries for {n} particles")
    if not np.isin(half_sets, (0, 1)).all():
        raise ValueError("half sets must be 0 or 1 for every particle")
    aliases = same_partitions(labels)  # e.g. k-means clusters that are exactly the classes
    groups = [
        (name, g)
        for name, lab in labels.items()
        if name not in aliases
        for g in range(int(lab.max(initial=-1)) + 1)
    ]
    device = torch.device(device)
    per_group = 2 * accumulator_bytes(box_size, pad_factor, dtype)
    out: dict[str, list[GroupMaps | None]] = {
        k: [None] * (int(v.max(initial=-1)) + 1) for k, v in labels.items()
    }
    rank, world = _dist()
    for todo in _passes(groups, per_group, max_memory_bytes):
        accs = {
            (name, g, h): BackprojectionAccumulator(
                box_size,
                pad_factor,
                device=device,
                dtype=dtype,
                preweight_iterations=preweight_iterations,
            )
            for name, g in todo
            for h in (0, 1)
        }
        wanted = {name: np.full(n, -1, np.int64) for name in labels}
        for name, g in todo:
            wanted[name][labels[name] == g] = g
        keys = np.stack([*wanted.values(), half_sets], axis=1)
        batches = plan_batches(keys, batch_size)[rank::world]
        _accumulate(make_loader(batches), accs, wanted, half_sets, device, progress, len(batches))
        for acc in accs.values():
            if world > 1:
                _all_reduce(acc)
        task = progress.add_task("Half maps and full maps", total=len(todo)) if progress else None
        for name, g in todo:
            out[name][g] = _group_maps(
                name, g, accs.pop((name, g, 0)), accs.pop((name, g, 1)), wiener_snr
            )
            if task is not None:
                progress.advance(task)
    for name, (source, relabel) in aliases.items():
        out[name] = [replace(out[source][int(relabel[g])], labeling=name, group=g) for g in range(len(relabel))]
    return out


def same_partitions(labelings: Mapping[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
    """Labelings that split the particles exactly as an earlier one does, up to the numbering:
    ``{name: (earlier name, relabel)}`` with ``relabel[g]`` the earlier labeling's group holding
    exactly the particles of group ``g`` (same unlabelled ``-1`` particles, no empty group in
    either). Their maps are the earlier labeling's, reconstructed once."""
    out: dict[str, tuple[str, np.ndarray]] = {}
    labelings = {k: np.asarray(v).astype(np.int64).ravel() for k, v in labelings.items()}
    names = list(labelings)
    for j, name in enumerate(names):
        lab = labelings[name]
        for source in names[:j]:
            if source in out:
                continue
            relabel = _relabel(lab, labelings[source])
            if relabel is not None:
                out[name] = (source, relabel)
                break
    return out


def _relabel(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """``m`` with ``b == m[a]`` on every particle (a bijection of groups), or ``None``."""
    if not np.array_equal(a < 0, b < 0):
        return None
    ka, kb = int(a.max(initial=-1)) + 1, int(b.max(initial=-1)) + 1
    kept = a >= 0
    if ka != kb or ka == 0 or len(np.unique(a[kept])) != ka or len(np.unique(b[kept])) != kb:
        return None
    m = np.full(ka, -1, np.int64)
    m[a[kept]] = b[kept]
    return m if np.array_equal(m[a[kept]], b[kept]) and len(np.unique(m)) == ka else None


def _accumulate(loader, accs, wanted, half_sets, device, progress, total) -> None:
    """Insert each run of batches sharing one key (group in every labeling, half set) into one
    scratch accumulator, then add it to that key's group accumulators: every image is inserted
    once, whatever the number of labelings."""
    task = (
        progress.add_task("Reconstructing maps from particles", total=total) if progress else None
    )
    first = next(iter(accs.values()))
    scratch = BackprojectionAccumulator(
        first.box_size, first.pad_factor, device=device, dtype=first.weight.dtype
    )
    key = None

    def flush():
        for name, g in zip(wanted, key[:-1]):
            if g >= 0:
                accs[(name, g, key[-1])].merge(scratch)
        scratch.numerator.zero_()
        scratch.weight.zero_()
        scratch.count = 0

    for batch in loader:
        index = batch["index"].cpu().numpy()
        rows = np.stack([lab[index] for lab in wanted.values()] + [half_sets[index]], axis=1)
        if (rows != rows[0]).any() or (batch["half"].cpu().numpy() != rows[:, -1]).any():
            raise RuntimeError(
                "a reconstruction batch mixes groups or half sets (loader and plan disagree)"
            )
        if key is not None and tuple(rows[0]) != key:
            flush()
        key = tuple(int(v) for v in rows[0])
        ctf = ctf_table_compute(
            batch["ctf"].to(device, torch.float32),
            scratch.ctf_size,
            batch["apix"].to(device, torch.float32),
        )
        scratch.add(
            batch["image"].to(device, torch.float32),
            batch["rotation"].to(device, torch.float32),
            -batch["origin_px"].to(device, torch.float32),
            ctf,
        )
        if task is not None:
            progress.advance(task)
    if key is not None:
        flush()


def _group_maps(name, g, acc1, acc2, wiener_snr) -> GroupMaps:
    """Half maps and the full map (from the merged sums) of one group; a map of no particles is
    zero (not reconstructed)."""
    counts = (int(acc1.count), int(acc2.count))
    half1, half2 = (_map(acc, wiener_snr) for acc in (acc1, acc2))
    acc1.merge(acc2)
    full = _map(acc1, wiener_snr)
    return GroupMaps(labeling=name, group=g, n_half=counts, half1=half1, half2=half2, full=full)


def _map(acc: BackprojectionAccumulator, wiener_snr: float) -> Tensor:
    if acc.count == 0:
        return torch.zeros((acc.box_size,) * 3, dtype=torch.float32)
    return acc.reconstruct(wiener_snr=wiener_snr).float().cpu()
