"""Clustering around landscape states and energy-based particle voting (AlphaCryo4D).

Stage 7 of AlphaCryo4D (Wu et al. 2022, section 4.8): every particle was used in ``M``
resampled volumes, so it has ``M`` points ("votes") on the landscape. Volumes within a
radius of a state's centre form that state's cluster (:func:`assign_to_centers`); a particle
joins the state whose cluster holds more than ``M / 2`` of its volumes, i.e. at least
``floor(M / 2) + 1`` (:func:`majority_vote`). Since a particle has exactly ``M`` votes, at
most one state can reach that threshold: no particle is ever assigned twice. Particles
without a majority are discarded.

Particles are identified exactly: by their row in the consensus particle table (volumes made
by ``hetero``), or by the parsed ``rlnImageName`` key ``(index, stack)`` of per-volume STAR
files made elsewhere (:func:`memberships_from_star_files`); the reference matched substrings
(``grep -F``), which confuses ``1@a.mrcs`` with ``11@a.mrcs``.

For a model with one embedding point per particle (``M = 1``) the same functions give the
particles around each state along a path: :func:`assign_to_centers` on the particles.

Example usage::

    labels, dist = assign_to_centers(volume_xy, centers, radius=30.0)   # (V,), -1 = none
    result = majority_vote(members, labels, n_particles=N, n_states=len(centers))
    result.labels            # (N,) voted state, -1 = discarded
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Memberships:
    """Which particles each volume was reconstructed from, in CSR form.

    :param indptr: ``(V + 1,)`` offsets; volume ``v`` holds ``indices[indptr[v]:indptr[v+1]]``.
    :param indices: particle indices (0-based rows of the particle table).
    :param n_particles: size of the particle table.
    """

    indptr: np.ndarray
    indices: np.ndarray
    n_particles: int

    @classmethod
    def from_lists(cls, lists: Sequence[np.ndarray], n_particles: int) -> Memberships:
        """From one array of particle indices per volume (duplicates within a volume are
        counted once)."""
        cleaned = [np.unique(np.asarray(a, dtype=np.int64).ravel()) for a in lists]
        indptr = np.concatenate([[0], np.cumsum([len(a) for a in cleaned])]).astype(np.int64)
        indices = np.concatenate(cleaned) if cleaned else np.zeros(0, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= n_particles):
            raise ValueError(f"Memberships: particle indices outside 0..{n_particles - 1}")
        return cls(indptr, indices.astype(np.int64), int(n_particles))

    @property
    def n_volumes(self) -> int:
        return len(self.indptr) - 1

    @property
    def counts(self) -> np.ndarray:
        """``(V,)`` particles per volume (``n_v`` of the pseudo-energy)."""
        return np.diff(self.indptr)

    def volume(self, v: int) -> np.ndarray:
        return self.indices[self.indptr[v] : self.indptr[v + 1]]

    def per_particle(self) -> np.ndarray:
        """``(N,)`` number of volumes holding each particle (``M`` after shuffling)."""
        return np.bincount(self.indices, minlength=self.n_particles)

    def matrix(self):
        """``(V, N)`` scipy CSR incidence matrix (ones)."""
        from scipy.sparse import csr_matrix

        data = np.ones(len(self.indices), dtype=np.int32)
        return csr_matrix((data, self.indices, self.indptr), shape=(self.n_volumes, self.n_particles))


@dataclass
class VoteResult:
    """Outcome of :func:`majority_vote`.

    :param labels: ``(N,)`` int64 state of each particle, ``-1`` = discarded.
    :param winning_votes: ``(N,)`` votes the particle gave its state (0 if discarded).
    :param memberships: ``(N,)`` volumes holding each particle (``M``).
    :param threshold: votes needed.
    :param counts: ``(K,)`` particles per state.
    """

    labels: np.ndarray
    winning_votes: np.ndarray
    memberships: np.ndarray
    threshold: int
    counts: np.ndarray

    @property
    def n_discarded(self) -> int:
        return int(np.sum(self.labels < 0))

    def state(self, k: int) -> np.ndarray:
        """Particle indices voted into state ``k`` (ascending)."""
        return np.flatnonzero(self.labels == k)


def assign_to_centers(
    points: np.ndarray, centers: np.ndarray, radius: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Each point to its nearest centre if closer than ``radius`` (the reference's disks,
    overlaps resolved by the nearest centre).

    :param points: ``(P, 2)`` embedding coordinates (volumes, or particles for ``M = 1``).
    :param centers: ``(K, 2)`` state centres.
    :param radius: cluster radius in embedding units; ``None`` = no limit (Voronoi cells).
    :return: ``(labels (P,) int64 with -1 = outside every disk, distance (P,) to the nearest
        centre)``.
    """
    points = np.asarray(points, dtype=np.float64)
    centers = np.asarray(centers, dtype=np.float64)
    if len(centers) == 0:
        raise ValueError("assign_to_centers: no centres")
    labels = np.zeros(len(points), dtype=np.int64)
    dist = np.zeros(len(points))
    for lo in range(0, len(points), 65536):
        chunk = points[lo : lo + 65536]
        d = np.sqrt(((chunk[:, None, :] - centers[None, :, :]) ** 2).sum(-1))
        labels[lo : lo + len(chunk)] = np.argmin(d, axis=1)
        dist[lo : lo + len(chunk)] = d[np.arange(len(chunk)), labels[lo : lo + len(chunk)]]
    if radius is not None:
        labels[dist >= float(radius)] = -1
    return labels, dist


def default_radius(centers: np.ndarray) -> float:
    """Cluster radius when none is given: the median distance from a centre to its nearest
    other centre (neighbouring disks then meet at about half their radius)."""
    centers = np.asarray(centers, dtype=np.float64)
    if len(centers) < 2:
        raise ValueError("default_radius: need at least two centres (pass a radius)")
    d = np.sqrt(((centers[:, None] - centers[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return float(np.median(d.min(1)))


def majority_threshold(m: int) -> int:
    """Votes needed for an exclusive majority of ``m`` memberships: ``floor(m / 2) + 1``."""
    return int(m) // 2 + 1


def majority_vote(
    members: Memberships,
    volume_labels: np.ndarray,
    n_states: int,
    threshold: int | None = None,
) -> VoteResult:
    """Energy-based particle voting (AlphaCryo4D section 4.8).

    ``votes[p, k]`` = number of volumes of state ``k`` (``volume_labels == k``) that hold
    particle ``p``; ``p`` is assigned to ``k`` when ``votes[p, k] >= threshold``.

    :param members: the particles of every volume (``V`` volumes).
    :param volume_labels: ``(V,)`` state of each volume, ``-1`` = in no cluster.
    :param n_states: number of states ``K``.
    :param threshold: votes needed; default ``floor(M / 2) + 1`` with ``M`` the largest
        number of volumes holding one particle.
    :raises ValueError: ``threshold <= M / 2`` (a particle could win two states), or shapes
        that do not match.
    """
    from scipy.sparse import csr_matrix

    volume_labels = np.asarray(volume_labels, dtype=np.int64).ravel()
    if len(volume_labels) != members.n_volumes:
        raise ValueError(
            f"majority_vote: {len(volume_labels)} volume labels for {members.n_volumes} volumes"
        )
    if volume_labels.size and volume_labels.max() >= n_states:
        raise ValueError(f"majority_vote: volume label {volume_labels.max()} >= n_states {n_states}")
    per_particle = members.per_particle()
    m = int(per_particle.max()) if per_particle.size else 0
    threshold = majority_threshold(m) if threshold is None else int(threshold)
    if 2 * threshold <= m:
        raise ValueError(
            f"voting threshold {threshold} is not a majority of the M = {m} volumes a particle "
            f"is in: a particle could be voted into two states; use at least {majority_threshold(m)}"
        )
    labeled = np.flatnonzero(volume_labels >= 0)
    onehot = csr_matrix(
        (np.ones(len(labeled), np.int32), (labeled, volume_labels[labeled])),
        shape=(members.n_volumes, n_states),
    )
    votes = (members.matrix().T @ onehot).tocsr()  # (N, K)
    votes.data[votes.data < threshold] = 0
    votes.eliminate_zeros()
    winners = np.diff(votes.indptr)
    if np.any(winners > 1):  # cannot happen with threshold > M / 2; guard the invariant
        raise AssertionError("majority_vote: a particle reached the threshold in two states")
    labels = np.full(members.n_particles, -1, dtype=np.int64)
    won = np.repeat(np.arange(members.n_particles), winners)
    labels[won] = votes.indices
    winning = np.zeros(members.n_particles, dtype=np.int64)
    winning[won] = votes.data
    counts = np.bincount(labels[labels >= 0], minlength=n_states)
    return VoteResult(labels, winning, per_particle, threshold, counts)


def nearest_vote(
    members: Memberships,
    volume_points: np.ndarray,
    centers: np.ndarray,
    max_distance: float | None = None,
) -> VoteResult:
    """Distance-based classification, the paper's alternative to voting (section 4.9): each
    particle joins the state nearest to any of its volumes; with ``max_distance`` particles
    whose nearest volume is further away from every state are discarded. Keeps more particles
    than :func:`majority_vote`, but does not test their reproducibility.

    :param volume_points: ``(V, 2)`` volume positions (NaN rows: volumes not on the landscape).
    :param centers: ``(K, 2)`` states.
    """
    points = np.asarray(volume_points, dtype=np.float64)
    ok = np.all(np.isfinite(points), axis=1)
    nearest = np.full(len(points), -1, dtype=np.int64)
    dist = np.full(len(points), np.inf)
    nearest[ok], dist[ok] = assign_to_centers(points[ok], centers, None)
    vol_of = np.repeat(np.arange(members.n_volumes), members.counts)
    # per particle, its volume nearest to a state decides (ties: the lower state)
    order = np.lexsort((nearest[vol_of], dist[vol_of], members.indices))
    particle = members.indices[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = particle[1:] != particle[:-1]
    labels = np.full(members.n_particles, -1, dtype=np.int64)
    best = np.full(members.n_particles, np.inf)
    labels[particle[first]] = nearest[vol_of[order[first]]]
    best[particle[first]] = dist[vol_of[order[first]]]
    if max_distance is not None:
        labels[best > float(max_distance)] = -1
    labels[~np.isfinite(best)] = -1
    per_particle = members.per_particle()
    kept = labels >= 0
    counts_k = np.bincount(labels[kept], minlength=len(centers))
    return VoteResult(labels, kept.astype(np.int64), per_particle, 1, counts_k)


# ----------------------------------------------------------------------------- STAR inputs
def image_name_keys(names: Sequence[str], source: str = "", bases: Sequence | None = None) -> np.ndarray:
    """Exact particle identities from ``rlnImageName`` values ``index@stack``: the 1-based
    index as an integer (``000012@a.mrcs`` and ``12@a.mrcs`` are the same image) and the stack.
    With ``bases`` the stack is resolved to an absolute path as the STAR readers do (RELION
    writes names relative to its project folder; subsets written elsewhere name the same stack
    differently), else kept as written. Returns ``(N,)`` strings ``"<index>@<stack>"``.

    :raises ValueError: a name without ``@`` or a non-integer index (naming ``source``).
    """
    parsed = []
    for i, name in enumerate(names):
        text = str(name).strip()
        idx, at, stack = text.partition("@")
        if not at or not idx.strip().isdigit() or not stack:
            raise ValueError(
                f"{source}: row {i + 1}: rlnImageName {text!r} is not '<index>@<stack>'"
            )
        parsed.append((int(idx), stack))
    resolved: dict[str, str] = {}
    if bases is not None:
        from hetero.data.io._paths import resolve_names

        resolved = resolve_names({s for _, s in parsed}, bases)
    return np.asarray([f"{i}@{resolved.get(s, s)}" for i, s in parsed], dtype=object)


def table_keys(table) -> np.ndarray:
    """The keys of :func:`image_name_keys` (resolved stacks) for a particle table."""
    return np.asarray([f"{int(i) + 1}@{p}" for i, p in zip(table.image_indices, table.image_paths)], dtype=object)


def read_image_names(path: str | Path) -> np.ndarray:
    """``rlnImageName`` column of a RELION STAR file (3.0 or 3.1+ particle block)."""
    import starfile

    blocks = starfile.read(path, always_dict=True, parse_as_string=["rlnImageName"])
    for name in ("particles", *blocks):
        frame = blocks.get(name)
        if frame is not None and hasattr(frame, "columns") and "rlnImageName" in frame.columns:
            return frame["rlnImageName"].astype(str).to_numpy()
    raise ValueError(f"{path}: no particle block with column rlnImageName")


def star_file_keys(path: str | Path) -> np.ndarray:
    """Resolved particle keys of a STAR particle list (:func:`image_name_keys`)."""
    from hetero.data.io._paths import default_bases

    return image_name_keys(read_image_names(path), str(path), default_bases(path))


def memberships_from_star_files(paths: Sequence[str | Path]) -> tuple[Memberships, np.ndarray]:
    """Memberships of volumes given as one STAR particle list each (volumes made elsewhere).

    :return: ``(members, keys)``: particle ``i`` of ``members`` is image ``keys[i]``
        (sorted unique resolved ``"<index>@<stack>"`` over all files).
    """
    per_volume = [star_file_keys(p) for p in paths]
    keys = np.unique(np.concatenate(per_volume)) if per_volume else np.zeros(0, object)
    lists = [np.searchsorted(keys, k) for k in per_volume]
    return Memberships.from_lists(lists, len(keys)), keys
