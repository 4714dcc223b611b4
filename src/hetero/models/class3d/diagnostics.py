"""Is a classification degenerate? Facts about its classes, and the warnings they call for.

Maximum-likelihood classification converges confidently (posteriors near 1) to whatever fixed
point it reaches; a wrong one looks just as certain. Three signs of a degenerate or unstable
result, computed per replicate after each M-step (:func:`class_diagnostics`):

* **small classes**: a class holding less than ``min_fraction`` (1 %) of the particles;
* **near-identical classes**: two class maps whose Fourier shell correlation, averaged over
  shells 1 .. the E-step radius, exceeds ``max_similarity`` (0.98): the two classes cannot
  separate particles (e.g. both still the consensus);
* **view-biased classes**: a class whose particles' projection directions differ from those
  of all particles by more than chance. With ``d`` the unit projection direction (the third
  row of RELION's rotation ``A``), the orientation tensor ``T = <d d^T>`` of a class with
  ``n`` (posterior-weighted) particles is compared with the data's ``T_all``:
  ``z = |T_k - T_all|_F sqrt(n N / (N - n)) / sqrt(1 - |T_all|_F^2)`` (``|d d^T|_F = 1``,
  so ``1 - |T_all|^2`` is the per-particle variance; ``z^2`` is about ``chi^2_5 / 5`` for a
  random subset, ``z > 2.5`` has p ~ 1e-5). A class made of some views only lacks the Fourier
  regions of the others, fits only its own views and keeps them: a self-consistent but
  wrong split (what ``init=consensus`` fell into on 2 planted states at SNR 1, see
  ``conf/model/class3d.yaml``). Real states can differ in preferred orientation, so this is
  a caution, not an error.

A fourth sign is a run stopped before it settled: **still changing**, more than
:data:`CONVERGED_CHANGES` (1 %) of the particles changed their best class in the last E-step
(RELION's "changes in optimal classes"; RELION runs its fixed number of iterations and says
nothing, the threshold is ours). On two planted states at SNR 1 (box 32) the wrong 5-iteration
runs changed 11-12 % of their particles in their last iteration and the right ones settled at
0 % one to three iterations after the split appeared (:func:`end_of_run_warning`).

The module logs one warning after the last iteration; the values are logged as metrics every
iteration (``class3d/min_class_fraction``, ``class3d/max_class_similarity``,
``class3d/max_view_bias``, ``train/changes``).

Example usage::

    facts = class_diagnostics(maps[u], weight[u], views[u], views_all[u], count[u], radius=12)
    facts["messages"]          # [] when nothing looks degenerate
    text = end_of_run_warning([facts], changes=hist_changes[-1])   # None: nothing to say
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hetero.physics.fourier import fft3_centered, radius_grid

#: Largest fraction of particles changing class in the last E-step of a run called settled.
CONVERGED_CHANGES = 0.01
#: Off-diagonal weight that makes the Euclidean norm of the 6-vector the Frobenius norm.
_SQRT2 = math.sqrt(2.0)


def view_tensor_entries(rotation: Tensor) -> Tensor:
    """``(B, 3, 3)`` RELION rotations ``A`` -> ``(B, 6)`` entries of ``d d^T`` for the projection
    direction ``d = A^T e_z`` (third row): ``xx, yy, zz, sqrt2 xy, sqrt2 xz, sqrt2 yz``."""
    d = rotation[..., 2, :].double()
    x, y, z = d[..., 0], d[..., 1], d[..., 2]
    return torch.stack([x * x, y * y, z * z, _SQRT2 * x * y, _SQRT2 * x * z, _SQRT2 * y * z], -1)


def view_bias(views: Tensor, weight: Tensor, views_all: Tensor, count: float) -> Tensor:
    """``z`` per class (module docstring) from the posterior-weighted sums ``views (K, 6)``,
    class weights ``weight (K,)`` and the sums over all particles ``views_all (6,)`` of
    ``count`` particles. Classes without weight get 0. ``(K,)`` float64."""
    n_all = max(float(count), 1.0)
    t_all = views_all.double() / n_all
    var = max(1.0 - float((t_all**2).sum()), 1e-12)
    w = weight.double().clamp(min=1e-12)
    t_k = views.double() / w[:, None]
    finite = n_all * w / (n_all - w).clamp(min=1e-12)
    z = torch.linalg.vector_norm(t_k - t_all, dim=-1) * torch.sqrt(finite / var)
    return torch.where(weight > 0.5, z, 0.0)


def class_similarity(maps: Tensor, radius: int) -> Tensor:
    """Mean FSC over shells ``1 .. radius`` between every pair of class maps ``(K, D, D, D)``:
    ``(K, K)`` float64, 1 on the diagonal (0 for an empty map). One FFT per map."""
    k, d = maps.shape[0], maps.shape[-1]
    r = max(1, min(int(radius), d // 2))
    f = fft3_centered(maps.double().cpu())
    shells = torch.round(radius_grid((d, d, d), dtype=torch.float64)).long().flatten()
    sel = (shells >= 1) & (shells <= r)
    idx = shells[sel] - 1
    f = f.reshape(k, -1)[:, sel]

    def per_shell(values: Tensor) -> Tensor:
        return torch.zeros(r, dtype=torch.float64).index_add_(0, idx, values)

    power = [per_shell(f[a].real**2 + f[a].imag**2) for a in range(k)]
    out = torch.eye(k, dtype=torch.float64)
    for a in range(k):
        for b in range(a + 1, k):
            cross = per_shell((f[a] * f[b].conj()).real)
            den = torch.sqrt(power[a] * power[b])
            curve = torch.where(den > 0, cross / den.clamp(min=1e-300), 0.0)
            out[a, b] = out[b, a] = float(curve.mean())
    return out


def class_diagnostics(
    maps: Tensor, weight: Tensor, views: Tensor, views_all: Tensor, count: float, radius: int,
    min_fraction: float = 0.01, max_similarity: float = 0.98, max_view_z: float = 2.5,
) -> dict:
    """The facts of one replicate's classes (module docstring) and a message for each sign of
    degeneracy: ``min_class_fraction``, ``max_class_similarity`` (over pairs; 0 for K = 1),
    ``max_view_bias``, ``messages`` (list of str, 1-based class numbers).

    :param maps: ``(K, D, D, D)``. :param weight: ``(K,)`` summed posteriors of the E-step.
    :param views, views_all, count: as :func:`view_bias`. :param radius: E-step radius (shells).
    """
    k = maps.shape[0]
    weight = weight.double().cpu()
    prior = weight / weight.sum().clamp(min=1e-300)
    messages = []
    small = [i for i in range(k) if float(prior[i]) < min_fraction]
    for i in small:
        messages.append(f"class {i + 1} holds {100 * float(prior[i]):.2g}% of the particles "
                        f"(< {100 * min_fraction:g}%)")
    sim = class_similarity(maps, radius)
    best = 0.0
    for a in range(k):
        for b in range(a + 1, k):
            s = float(sim[a, b])
            best = max(best, s)
            if s > max_similarity:
                messages.append(f"classes {a + 1} and {b + 1} are near-identical (mean FSC {s:.3f} "
                                f"between their maps up to shell {int(radius)})")
    z = view_bias(views.cpu(), weight, views_all.cpu(), count)
    for i in range(k):
        if float(z[i]) > max_view_z and i not in small:
            messages.append(f"class {i + 1} ({100 * float(prior[i]):.0f}% of the particles) is made of "
                            f"particular views (view bias z = {float(z[i]):.1f}; > {max_view_z:g} by "
                            "chance has p ~ 1e-5): possibly a view-dependent split, not a state")
    return {"min_class_fraction": float(prior.min()), "max_class_similarity": best,
            "max_view_bias": float(z.max()) if k else 0.0, "messages": messages}


def unsettled_message(changes: Tensor, iterations_key: str = "model.n_iterations") -> str | None:
    """``"... still changing ..."`` when a replicate's last E-step moved more than
    :data:`CONVERGED_CHANGES` of its particles, else None.

    :param changes: ``(U,)`` fraction of particles whose best class changed in the last E-step
        (NaN where it was not measured).
    :param iterations_key: the config key that set the number of iterations (named in the advice).
    """
    values = [float(c) for c in changes.tolist()]
    moving = [c for c in values if c > CONVERGED_CHANGES]
    if not moving:
        return None
    return ((f"{len(moving)} of {len(values)} replicates are " if len(values) > 1 else "the classes are ")
            + f"still changing: {100 * max(moving):.1f}% of the particles changed class in the last "
            f"iteration (settled: <= {100 * CONVERGED_CHANGES:g}%); run more iterations ({iterations_key})")


def end_of_run_warning(facts: list[dict], changes: Tensor, iterations_key: str = "model.n_iterations") -> str | None:
    """The one warning of a finished run (module docstring), or None.

    :param facts: :func:`class_diagnostics` of each replicate.
    :param changes, iterations_key: as :func:`unsettled_message`.
    """
    u = len(facts)
    where = (lambda i: "") if u == 1 else (lambda i: f"replicate {i}: ")
    lines = [where(i) + m for i, f in enumerate(facts) for m in f["messages"]]
    if lines:
        lines.append("(degenerate classes: see conf/model/class3d.yaml, init)")
    unsettled = unsettled_message(changes, iterations_key)
    if unsettled:
        lines.append(unsettled)
    if not lines:
        return None
    return ("class3d: the classes look unstable or degenerate after the last iteration; check them "
            "before using them:\n  " + "\n  ".join(lines))


def replicate_diagnostics(maps: Tensor, sums: dict[str, Tensor], radius: Tensor) -> tuple[list[dict], dict]:
    """:func:`class_diagnostics` of every replicate, and their worst values as metrics.

    :param maps: ``(U, K, D, D, D)``. :param sums: the iteration's sums (``class_weight``,
        ``views``, ``views_all``, ``count``). :param radius: ``(U,)`` E-step radii.
    :return: the facts per replicate, and ``class3d/min_class_fraction``,
        ``max_class_similarity``, ``max_view_bias``, ``degenerate_replicates``.
    """
    facts = [class_diagnostics(maps[u], sums["class_weight"][u], sums["views"][u], sums["views_all"][u],
                               float(sums["count"][u]), int(radius[u])) for u in range(maps.shape[0])]
    return facts, {
        "class3d/min_class_fraction": min(f["min_class_fraction"] for f in facts),
        "class3d/max_class_similarity": max(f["max_class_similarity"] for f in facts),
        "class3d/max_view_bias": max(f["max_view_bias"] for f in facts),
        "class3d/degenerate_replicates": float(sum(bool(f["messages"]) for f in facts)),
    }
