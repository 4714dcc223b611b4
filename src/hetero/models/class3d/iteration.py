"""What happens at the end of each EM iteration, given the iteration's summed statistics.

:func:`initial_references` ends the first iteration (RELION's seeding iteration): the initial
noise spectrum from the images' power, the consensus reconstruction of each replicate
low-passed to ``ini_high``, and from it the ``K`` initial references, either the consensus
perturbed per class (``init="consensus"``) or reconstructions of ``K`` seeded random subsets
(``init="random_subsets"``: what RELION's first iteration does with one ``--ref``).
:func:`update_references` ends every later iteration: regularised class reconstructions
(RELION Class3D's prior from the references' power, or auto-refine's from half-set FSCs,
:mod:`.mstep`), solvent flattening, priors, noise spectrum, next current
size, FSC against the previous map, and reseeding of empty classes (the largest class is
split).

Both return a :class:`References` with the new model state and log messages; the module copies
it into its buffers, so that every rank (holding the same reduced statistics) makes the same
decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from hetero.models.class3d.mstep import (
    class_priors,
    current_radius,
    half_set_fsc,
    last_ssnr_shell,
    lowpass,
    noise_spectrum,
    perturb,
    power_data_vs_prior,
    reconstructed_radius,
    regularised_reconstruct,
    shell_power,
    whole_map_ssnr,
)
from hetero.models.class3d.statistics import IterationStatistics
from hetero.physics.fsc import fsc, fsc_resolution
from hetero.utils.errors import ConfigError

#: Initial references (``conf/model/class3d.yaml``, init).
INITS = ("consensus", "random_subsets")


def check_options(init: str, tau2_source: str, class_resolution: str, accumulator_dtype: str, tau2_fudge: float,
                  n_classes: int, n_iterations: int) -> None:
    """Refuse ``model.*`` values class3d cannot act on.

    :raises ConfigError: naming the option, what it got and what it takes.
    """
    allowed = {"init": (init, INITS), "tau2_source": (tau2_source, ("power", "fsc")),
               "class_resolution": (class_resolution, ("ssnr", "half_set_fsc")),
               "accumulator_dtype": (accumulator_dtype, ("float32", "float64"))}
    for name, (value, choices) in allowed.items():
        if value not in choices:
            raise ConfigError(f"model.{name} must be one of {', '.join(choices)}; got {value!r}")
    if not 1 <= int(n_classes) <= 127:
        raise ConfigError(f"model.n_classes must be in 1..127; got {n_classes}")
    if tau2_fudge <= 0:
        raise ConfigError(f"model.tau2_fudge must be > 0; got {tau2_fudge}")
    if int(n_iterations) < 2:
        # 0 trains nothing (no checkpoint); 1 is only the seeding iteration: random classes
        raise ConfigError("model.n_iterations must be >= 2 (the first is the seeding iteration; the default is "
                          f"30); got {n_iterations}")


def iterations_key(trainer, n_iterations: int) -> str:
    """The option that sets how many EM iterations run: ``trainer.max_epochs`` when a trainer
    has one apart from ``n_iterations`` (it wins), else ``model.n_iterations``."""
    epochs = getattr(trainer, "max_epochs", None)
    return "trainer.max_epochs" if epochs is not None and epochs != int(n_iterations) else "model.n_iterations"


@dataclass
class Settings:
    """RELION's options of one classification (see ``conf/model/class3d.yaml``)."""

    box_size: int
    apix: float
    n_classes: int
    tau2_fudge: float = 4.0
    do_map: bool = True
    ini_high: float = 60.0
    incr_size: int = 10
    minres_map: int = 5
    init: str = "consensus"
    init_perturbation: float = 0.1
    min_class_particles: float = 1.0
    seed: int = 0
    tau2_source: str = "power"
    class_resolution: str = "ssnr"

    @property
    def needs_half_set_fsc(self) -> bool:
        """Whether an M-step reconstructs each class's half sets (2 more reconstructions)."""
        return self.tau2_source == "fsc" or self.class_resolution == "half_set_fsc"

    def shell(self, resolution_angstrom: float) -> int:
        """Fourier shell of a resolution (Å) in the training box."""
        return int(round(self.box_size * self.apix / resolution_angstrom))

    @property
    def nyquist(self) -> int:
        return self.box_size // 2


@dataclass
class References:
    """The model state after an M-step (``U`` replicates, ``K`` classes, ``S`` shells)."""

    maps: Tensor            # (U, K, D, D, D) float32
    sigma2: Tensor          # (U, S) float64
    prior: Tensor           # (U, K) float64
    radius: Tensor          # (U,) long: current size radius (shells)
    data_vs_prior: Tensor   # (U, K, S) float64
    fsc_change: Tensor      # (U, K) float64: resolution (Å) where FSC(new, old) drops below 0.5
    resolution: Tensor      # (U, K) float64: each class's resolution (Å), :func:`class_resolution`
    messages: list[str] = field(default_factory=list)


def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63)
    return torch.Generator().manual_seed(seed)


def initial_noise(stats: IterationStatistics, point_shells: Tensor, npix: Tensor) -> Tensor:
    """RELION's first noise estimate: ``(mean power - power of the mean image) / 2`` per shell
    and pixel, from the masked image spectra of each replicate. ``(U, S)``."""
    count = stats.sums["count"].clamp(min=1)
    mean = stats.mean_spectrum / count[:, None]
    mean_power = torch.zeros_like(stats.sums["power"]).index_add_(
        1, point_shells.to(mean.device), (mean.real**2 + mean.imag**2).double()
    )
    total = stats.sums["power"] / count[:, None] - mean_power
    return noise_spectrum(total.clamp(min=0), torch.ones_like(count), npix)


def class_resolution(cfg: Settings, fsc_k: Tensor | None, data_vs_prior: Tensor | None, r_max: int) -> float:
    """A class's resolution (Å): ``cfg.class_resolution == "ssnr"``: RELION Class3D's
    ``rlnEstimatedResolution``, the last shell before its ``data_vs_prior`` (SSNR) first drops
    below 1, within the current size ``r_max`` (NaN without a prior); ``"half_set_fsc"``: where
    the FSC of its unregularised half-set maps (``fsc_k``) drops below 0.143."""
    if cfg.class_resolution == "half_set_fsc" and fsc_k is not None:
        return fsc_resolution(fsc_k.float(), cfg.box_size, cfg.apix, threshold=0.143)
    if data_vs_prior is None or not bool((data_vs_prior > 0).any()):
        return float("nan")
    return cfg.box_size * cfg.apix / max(last_ssnr_shell(data_vs_prior, int(r_max) + 1), 1)


def _class_fsc(stats: IterationStatistics, cfg: Settings, c: int, r_max: int, consensus: bool = False):
    """The half-set FSC of class (or consensus) ``c`` when ``cfg`` needs it, else None."""
    return half_set_fsc(stats.half(c, 0, consensus), stats.half(c, 1, consensus), r_max) \
        if cfg.needs_half_set_fsc else None


def initial_references(
    stats: IterationStatistics, cfg: Settings, flatten, point_shells: Tensor, npix: Tensor
) -> References:
    """End of the first iteration (see the module docstring).

    :param flatten: callable applying solvent flattening to ``(..., D, D, D)`` maps.
    :param point_shells, npix: shells of the half-plane points and pixels per shell.
    """
    u_count, k_count, d = stats.n_replicates, stats.n_classes, cfg.box_size
    device = stats.sums["count"].device
    sigma2 = initial_noise(stats, point_shells, npix)
    # RELION's first iteration reconstructs up to the current size set by ini_high.
    r0 = min(cfg.nyquist, cfg.shell(cfg.ini_high) + cfg.incr_size) if cfg.ini_high > 0 else cfg.nyquist
    maps = torch.zeros(u_count, k_count, d, d, d, device=device)
    dvp = torch.zeros(u_count, k_count, sigma2.shape[1], dtype=torch.float64, device=device)
    priors = torch.full((u_count, k_count), 1.0 / k_count, dtype=torch.float64, device=device)
    radius = torch.full((u_count,), cfg.nyquist, dtype=torch.long)
    resolution = torch.full((u_count, k_count), float("nan"), dtype=torch.float64)
    for u in range(u_count):
        # RELION's reference: the consensus, low-passed to ini_high.
        acc = stats.accumulator(u, consensus=True)
        consensus = flatten(acc.reconstruct(r_max=reconstructed_radius(acc, r0)).float())
        if cfg.ini_high > 0:
            consensus = lowpass(consensus, cfg.shell(cfg.ini_high))
        if cfg.init == "random_subsets":
            for k in range(k_count):
                c = u * k_count + k
                fsc_k = _class_fsc(stats, cfg, c, r0)
                acc_k = stats.accumulator(c)
                prior_dvp = None
                if cfg.do_map and cfg.tau2_source == "power":
                    # RELION's seeding iteration: tau2 of the (low-passed) reference it started from.
                    prior_dvp = power_data_vs_prior(acc_k, shell_power(consensus), sigma2[u], cfg.tau2_fudge, r0)
                vol, dv = regularised_reconstruct(acc_k, fsc_k, cfg.tau2_fudge, r0, cfg.do_map, prior_dvp,
                                                  cfg.minres_map)
                maps[u, k] = flatten(vol)
                resolution[u, k] = class_resolution(cfg, fsc_k, dv, r0)
                if dv is not None:
                    dvp[u, k] = dv
            priors[u] = class_priors(stats.sums["class_weight"][u : u + 1])[0]
        else:
            fsc_c = _class_fsc(stats, cfg, u, r0, consensus=True)
            dv = cfg.tau2_fudge * whole_map_ssnr(fsc_c) if cfg.do_map and fsc_c is not None else None
            gen = _generator(cfg.seed + u)   # replicate u is a run with seed + u
            for k in range(k_count):
                maps[u, k] = perturb(consensus, gen, cfg.init_perturbation)
                if cfg.do_map and cfg.tau2_source == "power":
                    # RELION's initialiseDataVersusPrior: the reference's power, 1/K of the data.
                    dv = power_data_vs_prior(acc, shell_power(maps[u, k]), sigma2[u], cfg.tau2_fudge,
                                             cfg.nyquist, fraction=1.0 / k_count)
                resolution[u, k] = class_resolution(cfg, fsc_c, dv, r0)
                if dv is not None:
                    dvp[u, k] = dv
        if cfg.do_map:
            radius[u] = current_radius(dvp[u], priors[u], d, cfg.incr_size, cfg.minres_map)
    message = (
        f"initial references ({cfg.init}, consensus low-passed to {cfg.ini_high:g} Å); next E-step "
        f"up to shell {int(radius[0])} ({d * cfg.apix / max(int(radius[0]), 1):.1f} Å)"
    )
    fsc_change = torch.full((u_count, k_count), float("nan"), dtype=torch.float64)
    return References(maps, sigma2, priors, radius, dvp, fsc_change, resolution, [message])


def update_references(
    stats: IterationStatistics,
    cfg: Settings,
    flatten,
    old_maps: Tensor,
    old_radius: Tensor,
    npix: Tensor,
    iteration: int,
    reseed: bool = True,
    old_sigma2: Tensor | None = None,
) -> References:
    """End of EM iteration ``iteration`` (1-based count of completed M-steps before it).

    :param old_maps, old_radius: the references and current size the E-step used.
    :param old_sigma2: ``(U, S)`` the E-step's noise spectrum (needed by
        ``cfg.tau2_source == "power"``: RELION's ``tau2`` is the power spectrum of
        ``old_maps``, and its weights hold ``1 / sigma2``).
    :param reseed: reseed empty classes (off in the last iteration).
    """
    u_count, k_count, d = stats.n_replicates, stats.n_classes, cfg.box_size
    weight = stats.sums["class_weight"]
    maps = torch.zeros_like(old_maps)
    dvp = torch.zeros(u_count, k_count, d // 2 + 1, dtype=torch.float64, device=maps.device)
    fsc_change = torch.full((u_count, k_count), float("nan"), dtype=torch.float64)
    resolution = torch.full((u_count, k_count), float("nan"), dtype=torch.float64)
    for u in range(u_count):
        r = int(old_radius[u])
        for k in range(k_count):
            if weight[u, k] <= 0:
                continue  # RELION: a class without particles gets an empty map
            c = u * k_count + k
            fsc_k = _class_fsc(stats, cfg, c, r)
            acc = stats.accumulator(c)
            prior_dvp = None
            if cfg.do_map and cfg.tau2_source == "power":
                if old_sigma2 is None:
                    raise ValueError("tau2_source='power' needs the E-step's noise spectrum (old_sigma2)")
                prior_dvp = power_data_vs_prior(acc, shell_power(old_maps[u, k]), old_sigma2[u],
                                                cfg.tau2_fudge, r)
            vol, dv = regularised_reconstruct(acc, fsc_k, cfg.tau2_fudge, r, cfg.do_map, prior_dvp,
                                              cfg.minres_map)
            maps[u, k] = flatten(vol)
            resolution[u, k] = class_resolution(cfg, fsc_k, dv, r)
            if dv is not None:
                dvp[u, k] = dv
            curve = fsc(maps[u, k], old_maps[u, k])
            fsc_change[u, k] = fsc_resolution(curve, d, cfg.apix, threshold=0.5)
    prior = class_priors(weight)
    sigma2 = noise_spectrum(stats.sums["residual"], stats.sums["count"], npix)
    radius = torch.tensor([
        current_radius(dvp[u], prior[u], d, cfg.incr_size, cfg.minres_map) if cfg.do_map else cfg.nyquist
        for u in range(u_count)
    ], dtype=torch.long)
    refs = References(maps, sigma2, prior, radius, dvp, fsc_change, resolution)
    if reseed:
        _reseed_empty(refs, weight, cfg, iteration)
    else:
        for u, k in torch.nonzero(weight < cfg.min_class_particles).tolist():
            refs.messages.append(f"replicate {u}: class {k + 1} is empty ({float(weight[u, k]):.2g} "
                                 "particles) in the last iteration; not reseeded")
    return refs


def _reseed_empty(refs: References, weight: Tensor, cfg: Settings, iteration: int) -> None:
    """Classes holding less than ``min_class_particles`` get a perturbed copy of the largest
    class of their replicate, which gives them half of its prior."""
    for u in range(weight.shape[0]):
        empty = torch.nonzero(weight[u] < cfg.min_class_particles).flatten().tolist()
        for k in empty:
            donor = int(torch.argmax(refs.prior[u]))
            if donor in empty or refs.prior[u, donor] <= 0:
                continue
            gen = _generator(cfg.seed + u, iteration, k)
            refs.maps[u, k] = perturb(refs.maps[u, donor], gen, cfg.init_perturbation)
            refs.prior[u, donor] /= 2
            refs.prior[u, k] = refs.prior[u, donor]
            refs.data_vs_prior[u, k] = refs.data_vs_prior[u, donor]
            refs.messages.append(
                f"replicate {u}: class {k + 1} was empty ({float(weight[u, k]):.2g} particles); "
                f"reseeded from class {donor + 1} ({float(weight[u, donor]):.0f} particles)"
            )
