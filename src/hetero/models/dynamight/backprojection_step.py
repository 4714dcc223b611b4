"""Analysis step ``deformed_backprojection``: DynaMight's improved half maps.

``python analyze.py run_dir=<dynamight run> backprojection.enabled=true`` (config block
``backprojection`` of ``conf/analyze.yaml``). Per half set, with that half set's particles (the
data module's half sets), its own encoder's latents (``z_mu_half{1,2}`` of the inference pass)
and its own decoder and consensus, every image at the ORIGINAL box and pixel size is pulled
back into the half set's consensus frame and accumulated
(:mod:`hetero.models.dynamight.backprojection`: piecewise-rigid pull-back with deformed
``CTF^2`` weights, per-shell ``tau^2`` from the half-map FSC); the same particles are also
backprojected rigidly (one region, no motion) for comparison. One pass over the data module's
predict loader in batches of one half set; memory is ``2 (R + 1)`` accumulators whatever the
particle count, or, when they exceed ``backprojection.max_memory_gb``, as many as fit, the
regions split over several passes (:func:`half_maps`); under ``torch.distributed`` each rank
takes every ``world_size``-th batch and the sums are all-reduced.

Writes ``dynamight/backprojection/``: ``map_half1.mrc``, ``map_half2.mrc`` (RELION PostProcess
reads them), ``map.mrc`` (their average), ``rigid_half{1,2}.mrc``, ``rigid.mrc``, ``mask.mrc``
(from both half sets' consensus Gaussians, soft edge in Å), ``fsc.csv`` (deformed / rigid,
unmasked / masked corrected by phase randomisation as RELION's postprocess / masked
uncorrected / phase-randomised masked), ``inverse_consistency.json``; the figure ``figures/dynamight_fsc.png``;
metrics ``dynamight.backprojection`` (0.143 / 0.5 resolutions in Å, the gain) and
``dynamight.inverse_consistency``; the report section "DynaMight deformed backprojection".
"""

from __future__ import annotations

import json

import numpy as np
import torch

from hetero.analysis import plots as P
from hetero.analysis import report as R
from hetero.analysis.reconstruction import accumulator_bytes, plan_batches
from hetero.analysis.resolution import fsc_table, half_map_resolution
from hetero.data.io.mrc import write_volume
from hetero.models.dynamight import distributed as dist
from hetero.models.dynamight.backprojection import (
    DeformedBackprojection,
    Regions,
    local_rigid_transforms,
    make_regions,
    reconstruct_half_maps,
    reconstruct_half_maps_in_passes,
    region_passes,
)
from hetero.physics.ctf import ctf_table_compute
from hetero.physics.masks import soft_mask_from_volume
from hetero.utils.files import write_text
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)
SECTION = "DynaMight deformed backprojection"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class HalfSetDeformer:
    """One half set's forward deformation of its consensus Gaussians, in Å.

    :param vae: the half set's :class:`~hetero.models.dynamight.half.HalfSetVAE`.
    :param latents: ``(N, zdim)`` its encoder's latents of every particle (input order).
    """

    def __init__(self, vae, latents: np.ndarray) -> None:
        self.vae, self.latents = vae, latents
        self.rest = vae.consensus.positions_angstrom().detach().float()

    @torch.no_grad()
    def __call__(self, index: np.ndarray) -> torch.Tensor:
        """``(B, N, 3)`` deformed Gaussian centres (Å) of the particles ``index``."""
        dev = self.rest.device
        z = torch.as_tensor(self.latents[index], dtype=torch.float32, device=dev)
        positions, _ = self.vae.deformed(z)
        return self.vae.consensus.positions_angstrom(positions).float()


def backproject_halves(make_loader, half_sets: np.ndarray, deformers, regions: list[Regions],
                       box_size: int, batch_size: int = 64, pad_factor: int = 2,
                       dtype: torch.dtype = torch.float32, device="cpu", local_rotation: bool = True,
                       preweight_iterations: int = 10, progress=None, subset: list[int] | None = None,
                       rigid: bool = True) -> dict[str, list[DeformedBackprojection]]:
    """Accumulate every particle of each half set, deformed and rigid, in one pass over the data.

    :param make_loader: ``batches -> iterable of particle batches`` at the original box
        (``image``, ``rotation``, ``origin_px``, ``ctf``, ``apix``, ``index``, ``half``).
    :param half_sets: ``(N,)`` 0/1. :param deformers: per half set, ``.rest (N_g, 3)`` Å and
        ``deformer(index) -> (B, N_g, 3)`` Å. :param regions: per half set.
    :param subset: accumulate only these regions (in this order; ``None``: all), e.g. one of
        several passes when all do not fit in memory. :param rigid: also the rigid sums.
    :return: ``{"deformed": [half 1, half 2], "rigid": [half 1, half 2]}`` (sums all-reduced;
        no ``"rigid"`` without ``rigid``).
    """
    device = torch.device(device)
    kw = dict(pad_factor=pad_factor, device=device, dtype=dtype, preweight_iterations=preweight_iterations)
    subset = list(range(regions[0].n)) if subset is None else [int(r) for r in subset]
    out = {"deformed": [DeformedBackprojection(box_size, len(subset), **kw) for h in (0, 1)]}
    if rigid:
        out["rigid"] = [DeformedBackprojection(box_size, 1, **kw) for h in (0, 1)]
    half_sets = np.asarray(half_sets, dtype=np.int64)
    keys = np.stack([np.zeros_like(half_sets), half_sets], 1)
    batches = plan_batches(keys, batch_size)[dist.rank()::dist.world_size()]
    what = "rigid only" if not subset else f"regions {subset[0] + 1}-{subset[-1] + 1} of {regions[0].n}"
    task = progress.add_task(f"Deformed backprojection ({what})", total=len(batches)) if progress else None
    for batch in make_loader(batches):
        index = batch["index"].cpu().numpy()
        h = int(half_sets[index[0]])
        if (half_sets[index] != h).any():
            raise RuntimeError("a backprojection batch mixes half sets (loader and plan disagree)")
        apix = batch["apix"].to(device, torch.float32)
        images = batch["image"].to(device, torch.float32)
        rot = batch["rotation"].to(device, torch.float32)
        shifts = -batch["origin_px"].to(device, torch.float32)
        ctf = ctf_table_compute(batch["ctf"].to(device, torch.float32), box_size, apix)
        if subset:
            deformed = deformers[h](index).to(device)
            q, s = local_rigid_transforms(deformers[h].rest.to(device), deformed, regions[h].assignment,
                                          regions[h].n, rotation=local_rotation)
            out["deformed"][h].add(images, rot, shifts, ctf, q[:, subset], s[:, subset] / apix[:, None, None])
        if rigid:
            out["rigid"][h].add(images, rot, shifts, ctf)
        if task is not None:
            progress.advance(task)
    for kind in out.values():
        for bp in kind:
            bp.all_reduce()
    return out


def consensus_mask(model, box_size: int, apix: float, threshold: float, extend_angstrom: float,
                   soft_edge_angstrom: float) -> torch.Tensor:
    """Soft ``(D, D, D)`` mask from both half sets' consensus Gaussians rasterised on the original
    grid: above ``threshold`` x the maximum, extended and with a raised-cosine edge (both in Å,
    rounded to whole voxels)."""
    from hetero.physics.gaussians import rasterize_gaussians

    vols = []
    with torch.no_grad():
        for vae in model.halves:
            c = vae.consensus
            vols.append(rasterize_gaussians(c.positions_angstrom(), c.sigma_angstrom(), c.amplitudes(),
                                            box_size, apix).float().cpu())
    vol = torch.stack(vols).mean(0)
    return soft_mask_from_volume(vol, float(threshold) * float(vol.max()),
                                 int(round(extend_angstrom / apix)), int(round(soft_edge_angstrom / apix)))


def score(maps: dict, mask: torch.Tensor | None, apix: float) -> dict:
    """Half-map FSC (unmasked; masked, corrected by phase randomisation as RELION) and resolutions
    of ``{"half1", "half2"}`` (:func:`~hetero.analysis.resolution.half_map_resolution`, seed 0)."""
    return half_map_resolution(maps["half1"], maps["half2"], apix, mask)


def _bc(ctx):
    node = ctx.cfg.get("backprojection") if hasattr(ctx.cfg, "get") else None
    return node


def deformed_backprojection(ctx) -> None:
    """The step (module docstring); does nothing unless ``backprojection.enabled``."""
    bc = _bc(ctx)
    if not bc or not bc.get("enabled", False):
        return
    model = ctx.result.extras.get("model")
    if model is None or not hasattr(model, "halves"):
        raise RuntimeError("deformed backprojection needs the DynaMight model in result.extras['model']")
    pp = ctx.result.per_particle
    missing = {"z_mu_half1", "z_mu_half2"} - set(pp)
    if missing:
        raise RuntimeError(f"deformed backprojection needs the inference pass's {sorted(missing)}: "
                           "analyse with recompute_latents=true")
    dm = ctx.datamodule("DynaMight deformed backprojection")
    table = dm.table
    if len(table) != ctx.result.n_particles:
        raise ValueError(f"the data have {len(table)} particles but the run's latents "
                         f"{ctx.result.n_particles}: analyse with the particles the run was trained on")
    if len(np.unique(table.pixel_size_angstrom)) > 1:
        raise ValueError("deformed backprojection needs one pixel size for all particles")
    box, apix = int(table.box_size), float(table.pixel_size_angstrom[0])
    n_regions = int(bc.regions)
    deformers = [HalfSetDeformer(model.halves[h], np.asarray(pp[f"z_mu_half{h + 1}"])) for h in (0, 1)]
    regions = [make_regions(d.rest.cpu(), n_regions, bc.get("region_sigma_angstrom"), int(ctx.cfg.get("seed", 0)))
               for d in deformers]
    maps = half_maps(lambda batches: dm.predict_dataloader(original_size=True, batches=batches), table.half_set,
                     deformers, regions, box, apix, bc, ctx.progress)
    mc = bc.mask
    mask = consensus_mask(model, box, apix, float(mc.threshold), float(mc.extend_angstrom),
                          float(mc.soft_edge_angstrom))
    consistency = inverse_consistency_metrics(model, deformers, regions, box, apix, bc)
    if dist.rank() == 0:
        _write(ctx, maps, mask, box, apix, consistency, [int((table.half_set == h).sum()) for h in (0, 1)])


def half_maps(make_loader, half_sets, deformers, regions: list[Regions], box: int, apix: float, bc,
              progress=None) -> dict:
    """Deformed and rigid half maps (:func:`reconstruct_half_maps`), in one pass over the data
    when the ``2 x (R + 1)`` accumulators fit in ``bc.max_memory_gb``, else in several: the
    rigid sums and as many regions as fit in the first, the other regions in the next ones; the
    regions' maps are needed before and after the FSC prior, so every pass but the last is read
    twice (:func:`reconstruct_half_maps_in_passes`). Memory counted: the accumulators and the
    blending weights (``2 R D^3`` float32, kept for the whole step); the region maps being
    blended (``D^3`` each) come on top.

    :raises ValueError: not even the blending weights and the rigid pair of accumulators fit.
    """
    dtype, n_regions = DTYPES[str(bc.precision)], regions[0].n
    per_half = 2 * accumulator_bytes(box, int(bc.pad_factor), dtype)  # one region, both half sets
    weight_bytes = 2 * n_regions * box**3 * 4 if n_regions > 1 else 0
    limit = float(bc.max_memory_gb) * 2**30 - weight_bytes if bc.max_memory_gb else float("inf")
    capacity = n_regions + 1 if limit >= (n_regions + 1) * per_half else int(max(limit, 0) // per_half)
    try:
        passes = region_passes(n_regions, capacity, extra_first=1)
    except ValueError:
        raise ValueError(f"deformed backprojection needs at least {(per_half + weight_bytes) / 2**30:.2f} GiB "
                         f"({weight_bytes / 2**30:.2f} of blending weights and the rigid pair of accumulators, "
                         f"one per half set); allowed backprojection.max_memory_gb={bc.max_memory_gb}: lower "
                         "backprojection.pad_factor or backprojection.regions, or raise max_memory_gb") from None
    if len(passes) > 1:
        reads = len(passes) + sum(1 for c in passes[:-1] if c)
        log.warning("deformed backprojection: %d regions + rigid need %.2f GiB of accumulators and blending "
                    "weights, more than backprojection.max_memory_gb=%s: regions split over %d passes, %d reads "
                    "of the data", n_regions, ((n_regions + 1) * per_half + weight_bytes) / 2**30,
                    bc.max_memory_gb, len(passes), reads)
    wiener, rigid = float(bc.wiener_snr), {}

    def accumulate(subset):
        sums = backproject_halves(make_loader, half_sets, deformers, regions, box, int(bc.batch_size),
                                  int(bc.pad_factor), dtype, str(bc.device), bool(bc.local_rotation),
                                  int(bc.preweight_iterations), progress, subset=subset, rigid=not rigid)
        if "rigid" in sums:
            rigid.update(reconstruct_half_maps(sums.pop("rigid"), [torch.ones(1, box, box, box)] * 2, wiener))
        return sums["deformed"]

    weights = [r.weights(box, apix) for r in regions]  # (R, D^3) floats each: computed once
    deformed = reconstruct_half_maps_in_passes(accumulate, passes, lambda h, subset: weights[h][subset], wiener)
    return {"deformed": deformed, "rigid": rigid}


def inverse_consistency_metrics(model, deformers, regions, box, apix, bc) -> dict:
    """``||Gamma(Gamma^-1(y)) - y||`` (Å) of the iterative inverse for a sample of particles of
    each half set, over a grid inside the consensus' bounding sphere and over the deformed
    Gaussians (where ``Gamma^-1(Gamma(c)) = c``), and the local rigid fits' RMS error (Å); for a
    ``model=dynamight_inverse`` run also its learned inverse's (``"learned"``: consensus, grid,
    and its distance to the iterative inverse)."""
    from hetero.models.dynamight.inverse import (
        consensus_consistency,
        grid_points,
        half_set_field,
        inverse_consistency,
        iterative_inverse,
    )

    n = int(bc.get("consistency_particles", 32))
    rng = np.random.default_rng(0)
    out = {}
    for h, d in enumerate(deformers):
        pick = np.sort(rng.choice(len(d.latents), min(n, len(d.latents)), replace=False))
        z = torch.as_tensor(d.latents[pick], dtype=torch.float32, device=d.rest.device)
        field = half_set_field(d.vae, z)
        grid = grid_points(box, apix, max(1, box // 16), device=d.rest.device)
        radius = float(d.rest.norm(dim=-1).max())
        grid = grid[grid.norm(dim=-1) <= radius]
        iters, tol = int(bc.get("inverse_iterations", 50)), float(bc.get("inverse_tol_angstrom", 1e-3))
        with torch.no_grad():
            def inv(y, field=field, iters=iters, tol=tol):
                return iterative_inverse(field, y, iters, tol)[0]

            g_err = inverse_consistency(field, inv, grid.expand(len(pick), -1, -1))
            c_err = consensus_consistency(field, inv, d.rest.expand(len(pick), -1, -1))
            deformed = d(pick)
            q, s = local_rigid_transforms(d.rest, deformed, regions[h].assignment, regions[h].n)
            fit = torch.einsum("brij,nj->brni", q, d.rest) + s[:, :, None, :]
            fit = fit[:, regions[h].assignment, torch.arange(len(d.rest))]
            rigid_err = (fit - deformed).norm(dim=-1)
        out[f"half{h + 1}"] = {
            "particles": int(len(pick)), "grid_points": int(grid.shape[0]),
            "grid_mean": float(g_err.mean()), "grid_max": float(g_err.max()),
            "consensus_mean": float(c_err.mean()), "consensus_max": float(c_err.max()),
            "local_rigid_rms": float(rigid_err.pow(2).mean().sqrt()),
            "deformation_rms": float((deformed - d.rest).norm(dim=-1).pow(2).mean().sqrt())}
        if hasattr(model, "consistency"):  # a model=dynamight_inverse run: its learned inverse too
            with torch.no_grad():
                learned = model.consistency(z, h)
            out[f"half{h + 1}"]["learned"] = {k: float(v) for k, v in learned.items()}
    return out


def _write(ctx, maps, mask, box, apix, consistency, counts) -> None:
    folder = ctx.out / "dynamight" / "backprojection"
    files = []
    for kind, stem in (("deformed", "map"), ("rigid", "rigid")):
        m = maps[kind]
        for name, vol in ((f"{stem}_half1", m["half1"]), (f"{stem}_half2", m["half2"]),
                          (stem, (m["half1"] + m["half2"]) / 2)):
            files.append(write_volume(folder / f"{name}.mrc", vol.numpy(), apix, origin_angstrom=(0.0, 0.0, 0.0)))
    files.append(write_volume(folder / "mask.mrc", mask.numpy(), apix, origin_angstrom=(0.0, 0.0, 0.0)))
    res = {kind: score(maps[kind], mask, apix) for kind in maps}
    curves = {f"{kind}_{m}": res[kind][f"fsc_{m}"] for kind in res for m in ("unmasked", "masked")}
    extra = {f"{kind}_{m}": res[kind][f"fsc_{m}"] for kind in res
             for m in ("masked_uncorrected", "phase_randomised")}
    files.append(write_text(folder / "fsc.csv", fsc_table({**curves, **extra}, box, apix)))
    files.append(write_text(folder / "inverse_consistency.json", json.dumps(consistency, indent=1) + "\n"))
    fig = P.fsc_curves(ctx.fig_dir / "dynamight_fsc.png", {k.replace("_", " "): v for k, v in curves.items()},
                       box, apix, title="Half-map FSC: deformed vs rigid (masked: corrected as RELION)")
    files.append(fig)
    ctx.files.extend(files)
    metrics = {kind: {k: v for k, v in r.items() if not k.startswith("fsc_")} for kind, r in res.items()}
    for m in ("unmasked", "masked"):
        metrics[f"gain_0.143_{m}_angstrom"] = res["rigid"][f"res_0.143_{m}"] - res["deformed"][f"res_0.143_{m}"]
    metrics["particles"] = counts
    ctx.metrics.setdefault("dynamight", {})["backprojection"] = metrics
    ctx.metrics["dynamight"]["inverse_consistency"] = consistency
    ctx.metrics.setdefault("headline", {})["deformed / rigid backprojection: FSC=0.143 (Å)"] = ", ".join(
        f"{res['deformed'][f'res_0.143_{m}']:.3g} / {res['rigid'][f'res_0.143_{m}']:.3g} ({label})"
        for m, label in (("unmasked", "unmasked"), ("masked", "masked, corrected")))
    _report(ctx, res, metrics, consistency, fig)


def _report(ctx, res, metrics, consistency, fig) -> None:
    bc = _bc(ctx)
    blocks = ctx.section(SECTION)
    blocks.append(R.paragraph(
        f"Each half set's particles pulled back into its consensus frame through its own deformations "
        f"({int(bc.regions)} locally rigid regions, blended by a partition of unity; CTF^2 weights "
        "deformed the same way) and reconstructed with RELION's gridding and a per-shell tau^2 from the "
        "half-map FSC, beside the rigid backprojection of the same particles. Masked: a soft mask from "
        "the consensus Gaussians; the masked FSC is corrected by phase randomisation beyond "
        f"{_beyond(res)} as RELION's postprocess (Chen et al. 2013; uncorrected and phase-randomised "
        "curves in fsc.csv). Files: dynamight/backprojection/ (map_half1.mrc, map_half2.mrc for "
        "relion_postprocess)."))
    rows = [(kind, *(res[kind][f"res_{t}_{m}"] for t in ("0.143", "0.5") for m in ("unmasked", "masked")))
            for kind in ("deformed", "rigid")]
    blocks.append(R.table(rows, ["backprojection", "FSC=0.143 (Å)", "FSC=0.143 masked, corrected (Å)",
                                 "FSC=0.5 (Å)", "FSC=0.5 masked, corrected (Å)"]))
    blocks.append(R.paragraph(
        f"Gain at FSC=0.143: {metrics['gain_0.143_unmasked_angstrom']:.2f} Å unmasked, "
        f"{metrics['gain_0.143_masked_angstrom']:.2f} Å masked and corrected (rigid minus deformed)."))
    blocks.append(R.image(fig, "Half-map FSC of the deformed and rigid backprojections"))
    blocks.append(R.table(
        [(h, c["grid_mean"], c["grid_max"], c["consensus_mean"], c["local_rigid_rms"], c["deformation_rms"])
         for h, c in consistency.items()],
        ["half set", "||G(G^-1(y)) - y|| grid mean (Å)", "grid max (Å)", "||G^-1(G(c)) - c|| mean (Å)",
         "local rigid fit RMS (Å)", "deformation RMS (Å)"]))


def _beyond(res: dict) -> str:
    """Where each backprojection's phases were randomised, e.g. ``"8.7 Å (deformed), 9.6 Å (rigid)"``."""
    parts = [f"{r['randomise_from_angstrom']:.3g} Å ({kind})" for kind, r in res.items()
             if r.get("randomise_from_angstrom") is not None]
    return ", ".join(parts) or "no shell (the unmasked FSC stays above 0.8: no correction)"


deformed_backprojection.options = "backprojection"  # its block in conf/analyze.yaml
