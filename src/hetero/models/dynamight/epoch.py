"""DynaMight's state and per-epoch tasks, as functions of the LightningModule.

All state lives in persistent buffers of the module (checkpointed, identical on every DDP rank
because every statistic is all-reduced before it is used):

======================= ============ =========================================================
buffer                  shape        meaning
======================= ============ =========================================================
``initialized``         ()           consensus models fitted to the initial map
``update_rate``         (2,)         per half: 1 -> decays -> 0 (consensus and lambda frozen)
``loss_history``        (2, 2)       last two checked epoch losses per half (NaN: none)
``check_failures``      (2,)         consecutive failed checks per half
``frozen_epoch``        ()           epoch at which both rates reached 0 (-1: not yet)
``reg_weight``          (2,)         lambda actually used (``factor * g_data / g_geo``)
``noise_power``         (D//2+1,)    noise spectrum estimate Sigma(k) per shell
``whitening``/``_on``   (D, D//2+1)  whitening weights W(k) and whether they are in use
``epoch_loss``          (2, 2)       this epoch's data-loss sum and count per half
``pool_score/_z``       (2, K[, Z])  this epoch's least-deformed particles per half
``latent_map``          (Z+1, Z)     affine map of half-2 latents into half-1 coordinates
``boundary_epoch``      ()           last epoch whose start-of-epoch tasks have run
======================= ============ =========================================================

Per-epoch statistics are summed over ranks after the last training batch
(:func:`sync_epoch_statistics`), before validation and the checkpoint. Start-of-epoch tasks (:func:`epoch_boundary`, for the epoch ``p`` just finished): train both
encoders on the validation particles and collect residual spectra; update the whitening;
check the update rates; re-estimate the consensus; step refined poses; rebuild the radius
graphs; calibrate lambda. Running them at the *start* of the next epoch means a checkpoint
written at the end of an epoch resumes them exactly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from hetero.losses.geometric import balanced_weight, gradient_norm, gradient_vector
from hetero.losses.whitening import radial_mean_rfft, rfft_shell_index, whitening_weights
from hetero.models.dynamight import distributed as dist
from hetero.models.dynamight.half import PreparedBatch
from hetero.models.dynamight.schedule import update_rate_check
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__)


def register_state(m, box: int, zdim: int, pooled: int) -> None:
    n_shells = box // 2 + 1
    rb = m.register_buffer
    rb("initialized", torch.tensor(False))
    rb("update_rate", torch.ones(2))
    rb("loss_history", torch.full((2, 2), float("nan")))
    rb("check_failures", torch.zeros(2, dtype=torch.long))
    rb("frozen_epoch", torch.tensor(-1, dtype=torch.long))
    rb("reg_weight", torch.zeros(2))
    rb("noise_power", torch.ones(n_shells))
    rb("whitening", torch.ones(box, n_shells))
    rb("whitening_on", torch.tensor(False))
    rb("epoch_loss", torch.zeros(2, 2))
    rb("pool_score", torch.full((2, pooled), float("inf")))
    rb("pool_z", torch.zeros(2, pooled, zdim))
    latent_map = torch.cat([torch.eye(zdim), torch.zeros(1, zdim)])
    rb("latent_map", latent_map)
    rb("boundary_epoch", torch.tensor(-1, dtype=torch.long))
    rb("align_stats", torch.zeros(2 * zdim + 1, 2 * zdim + 1), persistent=False)
    rb("shells", rfft_shell_index(box), persistent=False)


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------


def rebuild_graphs(m) -> None:
    m.graphs = [m.regularizer.graph(vae.consensus.positions_angstrom().detach()) for vae in m.halves]


# ---------------------------------------------------------------------------------------------
# Per batch
# ---------------------------------------------------------------------------------------------


def refined_poses(m, prep: PreparedBatch) -> tuple[Tensor, Tensor | None]:
    """Rotations and extra shifts (pixels) with the per-particle refinements (if enabled)."""
    if not m.pose_refinement:
        return prep.rotations, None
    w = m.pose_rotation[prep.index].float()
    skew = torch.zeros(len(w), 3, 3, device=w.device)
    skew[:, 0, 1], skew[:, 0, 2], skew[:, 1, 2] = -w[:, 2], w[:, 1], -w[:, 0]
    skew = skew - skew.transpose(1, 2)
    return prep.rotations @ torch.linalg.matrix_exp(skew), m.pose_shift[prep.index].float()


@torch.no_grad()
def record_batch(m, h: int, out: dict, n: int) -> None:
    """Epoch loss sums and the pool of least-deformed particles of half ``h``."""
    m.epoch_loss[h, 0] += out["data"].detach().float() * n
    m.epoch_loss[h, 1] += n
    if "deformation" not in out:
        return
    score = torch.cat([m.pool_score[h], out["deformation"].float()])
    z = torch.cat([m.pool_z[h], out["z"].detach().float()])
    keep = torch.topk(score, m.pool_score.shape[1], largest=False).indices
    m.pool_score[h] = score[keep]
    m.pool_z[h] = z[keep]


def _group_params(m, group: str, h: int) -> list[Tensor]:
    return list(getattr(m.halves[h], group).parameters())


def set_learning_rates(m, opt, phase: str) -> dict[str, bool]:
    """Per-group learning rates for ``phase``; returns which groups step."""
    base = m.base_lr()
    active = {}
    for g in opt.param_groups:
        if g["name"] == "pose":
            active["pose"] = False  # stepped once per epoch (step_poses)
            continue
        group, h = g["name"][:-1], int(g["name"][-1])
        rate = float(m.update_rate[h])
        if group == "consensus":
            lr = (m.lrs["warmup"] or base) if phase == "warmup" else (m.lrs["consensus"] or base) * rate
            on = lr > 0
        else:
            lr = m.lrs[group] or base
            on = phase == "main"
        g["lr"] = lr
        active[g["name"]] = on
    return active


def step_groups(m, lightning_opt, phase: str, counts: Tensor) -> None:
    """Sum gradients over ranks, divide by each half's particle count, step the active groups."""
    opt = lightning_opt.optimizer
    active = set_learning_rates(m, opt, phase)
    dist.all_reduce_sum(counts)
    for g in opt.param_groups:
        if not active[g["name"]] or float(counts[int(g["name"][-1])]) == 0:
            for p in g["params"]:
                p.grad = None
            continue
        h = int(g["name"][-1])
        dist.sum_gradients(g["params"])
        for p in g["params"]:
            if p.grad is not None:
                p.grad.div_(counts[h])
    if phase == "warmup" and not m.warmup_updates_positions:
        for vae in m.halves:
            vae.consensus.positions.grad = None
    lightning_opt.step()


# ---------------------------------------------------------------------------------------------
# Start of an epoch
# ---------------------------------------------------------------------------------------------


def epoch_boundary(m, epoch: int) -> None:
    """Tasks before ``epoch`` for the finished epoch ``epoch - 1`` (once per epoch)."""
    if int(m.boundary_epoch) >= epoch:
        return
    p = epoch - 1
    sched = m.schedule
    if p >= 0:
        frozen = bool(m.frozen_epoch >= 0)
        if not sched.is_warmup(p):
            spectra = validation_pass(m, train_encoders=True)
            if sched.whitening_active(p) and spectra is not None and m.noise_whitening:
                update_whitening(m, spectra)
        if not frozen:
            check_update_rates(m, p)
            if sched.reestimates_consensus(p):
                reestimate_consensus(m)
        if m.pose_refinement:
            step_poses(m)
    rebuild_graphs(m)
    if sched.calibrates(epoch):
        calibrate_regularization(m)
    m.epoch_loss.zero_()
    m.pool_score.fill_(float("inf"))
    m.boundary_epoch.fill_(epoch)


def sync_epoch_statistics(m) -> None:
    """After an epoch's last batch (before validation and the checkpoint): sum the epoch losses
    and merge the least-deformed pools over ranks, so the checkpoint holds the global values."""
    if dist.world_size() <= 1:
        return
    dist.all_reduce_sum(m.epoch_loss)
    if m.pose_refinement:
        dist.all_reduce_sum(m.pose_grad)
    for h in (0, 1):
        score, z = dist.gather_rows(m.pool_score[h]), dist.gather_rows(m.pool_z[h])
        keep = torch.topk(score, m.pool_score.shape[1], largest=False).indices
        m.pool_score[h], m.pool_z[h] = score[keep], z[keep]


def _shard(positions: np.ndarray) -> np.ndarray:
    r, w = dist.rank(), dist.world_size()
    return np.array_split(positions, w)[r]


def _batches(dataset, positions: np.ndarray, size: int, device):
    """This rank's share of ``positions`` in batches; every rank yields the same number of
    items (``None`` once its share is exhausted) so collectives stay matched."""
    w = dist.world_size()
    mine = _shard(positions)
    n_iter = math.ceil(math.ceil(len(positions) / w) / size) if len(positions) else 0
    for i in range(n_iter):
        chunk = mine[i * size : (i + 1) * size]
        if len(chunk) == 0:
            yield None
            continue
        batch = dataset.read_batch(chunk)
        yield {k: v.to(device) for k, v in batch.items()}


def validation_pass(m, train_encoders: bool) -> Tensor | None:
    """Train both encoders on this rank's validation particles (decoders untouched) and
    return the radial residual spectra ``(2, D//2+1)`` summed over all ranks' particles."""
    dm = m.trainer.datamodule
    ds = getattr(dm, "val_dataset", None)
    if ds is None or len(ds) == 0:
        return None
    n_shells = m.box_size // 2 + 1
    sums = torch.zeros(2, n_shells + 1, device=m.device)
    opt = m.optimizers().optimizer
    for g in opt.param_groups:
        if g["name"].startswith("encoder"):
            g["lr"] = m.lrs["encoder"] or m.base_lr()
    for batch in _batches(ds, np.arange(len(ds)), m.cfg["boundary_batch_size"], m.device):
        opt.zero_grad(set_to_none=True)
        if batch is None:
            if train_encoders:
                _step_encoders(m, opt, 0)
            continue
        prep = m.prepare(batch)
        for h, vae in enumerate(m.halves):
            with torch.autocast(m.device.type, dtype=torch.bfloat16, enabled=_bf16(m)):
                out = vae.losses(prep, True, m.whitening_weights(), m.kl_weight)
            if train_encoders:
                (out["total"] * len(prep)).backward()
            with torch.no_grad():
                resid = (out["predicted"] - prep.target).abs().pow(2)
                sums[h, :n_shells] += radial_mean_rfft(resid, m.shells, n_shells).sum(0)
                sums[h, n_shells] += len(prep)
        if train_encoders:
            _step_encoders(m, opt, len(prep))
    dist.all_reduce_sum(sums)
    return sums[:, :n_shells] / sums[:, n_shells:].clamp(min=1)


def _bf16(m) -> bool:
    return "bf16" in str(getattr(m.trainer, "precision", ""))


def _step_encoders(m, opt, n: int) -> None:
    count = dist.all_reduce_sum(torch.tensor(float(n), device=m.device))
    params = [p for vae in m.halves for p in vae.encoder.parameters()]
    others = [p for g in opt.param_groups for p in g["params"] if not g["name"].startswith("encoder")]
    for p in others:
        p.grad = None
    dist.sum_gradients(params)
    if float(count) > 0:
        for p in params:
            p.grad.div_(count)
        opt.step()
    opt.zero_grad(set_to_none=True)


def update_whitening(m, spectra: Tensor) -> None:
    """``Sigma <- (Sigma + mean_h Err_h) / 2`` (the first time ``Sigma = mean Err``); ``W = 1/Sigma``."""
    err = spectra.mean(0)
    if bool(m.whitening_on):
        m.noise_power.copy_(0.5 * m.noise_power + 0.5 * err)
    else:
        m.noise_power.copy_(err)
        m.whitening_on.fill_(True)
    m.whitening.copy_(whitening_weights(m.noise_power, m.box_size))


def check_update_rates(m, p: int) -> None:
    sched = m.schedule
    if p >= sched.n_epochs:
        m.update_rate.zero_()
    elif (p + 1) % sched.check_every(m.n_particles or 1) == 0 and not sched.is_warmup(p):
        for h in (0, 1):
            if float(m.update_rate[h]) == 0 or float(m.epoch_loss[h, 1]) == 0:
                continue
            loss = float(m.epoch_loss[h, 0] / m.epoch_loss[h, 1])
            rate, hist, fails = update_rate_check(
                float(m.update_rate[h]), m.loss_history[h].tolist(), int(m.check_failures[h]), loss,
                m.cfg["update_decay"], m.cfg["update_floor"])
            m.update_rate[h] = rate
            m.loss_history[h] = torch.tensor(hist + [float("nan")] * (2 - len(hist)))
            m.check_failures[h] = fails
    if float(m.update_rate.max()) == 0 and int(m.frozen_epoch) < 0:
        m.frozen_epoch.fill_(p + 1)
        log.info(f"DynaMight: both update rates are 0 after epoch {p}; consensus and lambda frozen")


@torch.no_grad()
def reestimate_consensus(m) -> None:
    """``c <- c + rate (mean deformed c of the pooled least-deformed particles - c)``."""
    for h, vae in enumerate(m.halves):
        rate = float(m.update_rate[h])
        finite = torch.isfinite(m.pool_score[h])
        if rate == 0 or not finite.any():
            continue
        positions, _ = vae.deformed(m.pool_z[h][finite])
        c = vae.consensus.positions
        c.add_(rate * (positions.mean(0) - c))
        log.info(f"Half set {h + 1}: consensus re-estimated from {int(finite.sum())} least-deformed particles")


@torch.no_grad()
def accumulate_pose_gradients(m) -> None:
    """Move this batch's pose gradients into ``pose_grad`` (they are stepped once per epoch)."""
    if not m.pose_refinement:
        return
    for p, cols in ((m.pose_rotation, slice(0, 3)), (m.pose_shift, slice(3, 5))):
        if p.grad is not None:
            m.pose_grad[:, cols] += p.grad
            p.grad = None


def step_poses(m) -> None:
    """One Adam step of the per-particle poses on the epoch's accumulated gradients (already
    summed over ranks after the epoch's last batch)."""
    opt = m.optimizers().optimizer
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = None
    m.pose_rotation.grad = m.pose_grad[:, :3].clone()
    m.pose_shift.grad = m.pose_grad[:, 3:].clone()
    opt.step()
    opt.zero_grad(set_to_none=True)
    m.pose_grad.zero_()


def calibrate_regularization(m) -> None:
    """lambda_h = factor * sum_b ||grad L_data|| / max(sum_b ||grad R||, floor * ...) over the
    decoder parameters, on a fixed ``calibration_fraction`` of half ``h``'s training particles
    (reference). With ``loss.regularization_norm=accumulated`` the norms are those of the
    gradients summed over the batches, ``||sum_b grad||``: the noise of the data gradient averages
    out instead of adding up, so lambda balances the regulariser against the data's signal."""
    dm = m.trainer.datamodule
    ds = dm.train_dataset
    halves = np.asarray(dm.table.half_set)[dm.train_indices]
    rng = np.random.default_rng(m.cfg["init_seed"] + 1)
    accumulated = m.regularization_norm == "accumulated"
    size = sum(p.numel() for p in m.halves[0].decoder.parameters()) if accumulated else 1
    # (half, data|geometric): per_batch sums the batches' gradient norms, accumulated the
    # gradient vectors themselves (their norm is taken once all batches are in)
    sums = torch.zeros(2, 2, size, device=m.device)
    for h, vae in enumerate(m.halves):
        if float(m.update_rate[h]) == 0:
            continue
        pos = np.flatnonzero(halves == h)
        pos = np.sort(rng.permutation(pos)[: max(1, int(round(m.cfg["calibration_fraction"] * len(pos))))])
        params = list(vae.decoder.parameters())
        for batch in _batches(ds, pos, m.cfg["boundary_batch_size"], m.device):
            if batch is None:
                continue
            prep = m.prepare(batch)
            with torch.autocast(m.device.type, dtype=torch.bfloat16, enabled=_bf16(m)):
                out = vae.losses(prep, True, None, 0.0, m.regularizer, m.graphs[h], 1.0)
            grad = gradient_vector if accumulated else gradient_norm
            sums[h, 0] += grad(out["data"], params)
            sums[h, 1] += grad(out["geometric"], params, retain_graph=False)
    norms = dist.all_reduce_sum(sums).norm(dim=-1)  # per_batch: the norm of a 1-vector, itself
    for h in (0, 1):
        if float(m.update_rate[h]) > 0:
            m.reg_weight[h] = balanced_weight(norms[h, 0], norms[h, 1], m.regularization_factor,
                                              m.regularization_floor)
