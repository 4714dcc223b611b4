"""DynaMight's geometric regularisation of deformed Gaussian pseudo-atoms and its automatic
weight (Schwab et al., Nat. Methods 2024, "Regularization and model bias", eq. 5).

The smoothness prior without an atomic model: the graph ``E`` connects every pair of
consensus Gaussians closer than ``radius_factor`` (1.5) times the mean distance of each
Gaussian to its ``k`` (2) nearest neighbours; the deformation should keep those distances::

    R(E) = mean_{b, (i,j) in E} (|x'_i - x'_j| - d0_ij)^2                (distance preservation)
         + too_close_weight * mean_{b, (i,j) in E} max(0, d_cut - |x'_i - x'_j|)   (too close)

with ``d0`` the consensus edge lengths, ``d_cut = max(mean(d0), min_cut)`` and distances in Å.
The reference uses means and weights 1 and 0.01 (the paper writes eq. 5 as a sum); the graph
is rebuilt from the current consensus every epoch.

The weight lambda of ``R`` is not a fixed number: it is set so that the regulariser's gradient
is comparable to the data term's, ``lambda = factor * g_data / max(g_geo, floor * g_data)``
with ``g = sum over batches of ||grad_theta L||_2`` over the deformation decoder's parameters
(:func:`balanced_weight`, :func:`gradient_norm`); ``factor`` is ``loss.regularization_factor``
(0.9 in the reference CLI, 1 in RELION's GUI; higher = stiffer).

Example usage::

    graph = radius_graph(consensus_angstrom)                     # built once per epoch
    loss = GeometricRegularization()(deformed_angstrom, graph)   # (B, N, 3) -> scalar
    lam = balanced_weight(g_data, g_geo, factor=0.9)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn


@dataclass
class NeighbourGraph:
    """Edges of the consensus radius graph (both directions present).

    :param edges: ``(E, 2)`` int64 Gaussian indices. :param rest_lengths: ``(E,)`` consensus
        edge lengths ``d0`` (Å). :param mean_neighbour_distance: mean distance of a Gaussian to
        its ``k`` nearest neighbours (Å). :param cutoff: the too-close distance ``d_cut`` (Å).
    """

    edges: Tensor
    rest_lengths: Tensor
    mean_neighbour_distance: float
    cutoff: float

    def to(self, device) -> NeighbourGraph:
        return NeighbourGraph(self.edges.to(device), self.rest_lengths.to(device),
                              self.mean_neighbour_distance, self.cutoff)

    @property
    def n_edges(self) -> int:
        return int(self.edges.shape[0])


def radius_graph(
    positions_angstrom: Tensor, k: int = 2, radius_factor: float = 1.5, min_cutoff: float = 0.5
) -> NeighbourGraph:
    """The paper's smoothness graph of ``(N, 3)`` consensus positions (Å), by a k-d tree.

    :param k: nearest neighbours (self excluded) whose mean distance ``d_nn`` sets the radius.
    :param radius_factor: edges join pairs closer than ``radius_factor * d_nn``.
    :param min_cutoff: lower bound of ``d_cut`` (Å).
    :raises ValueError: fewer than ``k + 1`` positions.
    """
    from sklearn.neighbors import NearestNeighbors

    pos = positions_angstrom.detach().double().cpu().numpy()
    n = len(pos)
    if n < k + 1:
        raise ValueError(f"radius_graph needs at least {k + 1} positions, got {n}")
    tree = NearestNeighbors(n_neighbors=k + 1).fit(pos)
    dist, _ = tree.kneighbors(pos)
    d_nn = float(dist[:, 1:].mean())
    graph = tree.radius_neighbors_graph(pos, radius=radius_factor * d_nn, mode="distance")
    graph.setdiag(0)
    graph.eliminate_zeros()
    coo = graph.tocoo()
    edges = np.stack([coo.row, coo.col], 1).astype(np.int64)
    lengths = coo.data.astype(np.float64)
    cutoff = max(float(lengths.mean()) if len(lengths) else 0.0, float(min_cutoff))
    device = positions_angstrom.device
    return NeighbourGraph(
        torch.from_numpy(edges).to(device), torch.from_numpy(lengths).float().to(device), d_nn, cutoff
    )


def edge_lengths(positions: Tensor, edges: Tensor) -> Tensor:
    """``|x_i - x_j|`` for ``(..., N, 3)`` positions and ``(E, 2)`` edges -> ``(..., E)``."""
    diff = positions[..., edges[:, 0], :] - positions[..., edges[:, 1], :]
    return torch.sqrt((diff * diff).sum(-1) + 1e-12)


class GeometricRegularization(nn.Module):
    """The regulariser ``R`` of the module docstring (float32, Å^2).

    :param distance_weight: weight of distance preservation (reference 1).
    :param too_close_weight: weight of the linear too-close penalty (reference 0.01).
    :param k: nearest neighbours of the graph radius. :param radius_factor: graph radius factor.
    :param min_cutoff: lower bound of ``d_cut`` (Å).
    """

    def __init__(
        self,
        distance_weight: float = 1.0,
        too_close_weight: float = 0.01,
        k: int = 2,
        radius_factor: float = 1.5,
        min_cutoff: float = 0.5,
    ) -> None:
        super().__init__()
        self.distance_weight = float(distance_weight)
        self.too_close_weight = float(too_close_weight)
        self.k = int(k)
        self.radius_factor = float(radius_factor)
        self.min_cutoff = float(min_cutoff)

    def graph(self, consensus_angstrom: Tensor) -> NeighbourGraph:
        """The graph of the current consensus (rebuild every epoch)."""
        return radius_graph(consensus_angstrom, self.k, self.radius_factor, self.min_cutoff)

    def forward(self, deformed_angstrom: Tensor, graph: NeighbourGraph) -> dict[str, Tensor]:
        """``(B, N, 3)`` deformed positions (Å) -> ``{"total", "distance", "too_close"}``."""
        if graph.n_edges == 0:
            zero = deformed_angstrom.float().sum() * 0.0
            return {"total": zero, "distance": zero, "too_close": zero}
        d = edge_lengths(deformed_angstrom.float(), graph.edges)
        distance = ((d - graph.rest_lengths) ** 2).mean()
        too_close = torch.relu(graph.cutoff - d).mean()
        total = self.distance_weight * distance + self.too_close_weight * too_close
        return {"total": total, "distance": distance, "too_close": too_close}


def gradient_vector(loss: Tensor, parameters: list[Tensor], retain_graph: bool = True) -> Tensor:
    """``d loss / d theta`` over ``parameters`` as one flat float32 vector (unused ones: zeros)."""
    grads = torch.autograd.grad(loss, parameters, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).float().reshape(-1)
                      for g, p in zip(grads, parameters)])


def gradient_norm(loss: Tensor, parameters: list[Tensor], retain_graph: bool = True) -> Tensor:
    """``||d loss / d theta||_2`` over ``parameters`` (those without a gradient path count 0)."""
    return gradient_vector(loss, parameters, retain_graph).norm()


def balanced_weight(
    data_gradient_norm: Tensor | float,
    geometric_gradient_norm: Tensor | float,
    factor: float = 0.9,
    floor: float = 5e-4,
) -> float:
    """DynaMight's automatic regularisation weight (reference ``calibrate_regularization_parameter``).

    ``lambda = factor * g_data / max(g_geo, floor * g_data)``; 0 when ``g_data`` is 0 (e.g. a
    decoder whose zero-initialised last layer passes no gradient yet).
    """
    g_data = float(data_gradient_norm)
    g_geo = float(geometric_gradient_norm)
    if g_data <= 0.0:
        return 0.0
    return float(factor) * g_data / max(g_geo, float(floor) * g_data)


__all__ = [
    "GeometricRegularization",
    "NeighbourGraph",
    "balanced_weight",
    "edge_lengths",
    "gradient_norm",
    "gradient_vector",
    "radius_graph",
]
