"""``model=class3d``: RELION-style maximum-likelihood 3D classification with fixed poses.

RELION's Class3D with ``--skip_align`` (Scheres 2012, J. Mol. Biol. 415:406; J. Struct. Biol.
180:519) as a LightningModule with manual optimisation and no gradients:

- one epoch is one EM iteration; ``training_step`` is the E-step of a batch (posteriors of
  every (particle, replicate) pair over its replicate's ``K`` classes, :mod:`.estep`) and adds
  to the iteration's sufficient statistics (:mod:`.statistics`); the M-step (:mod:`.iteration`)
  runs once the epoch's batches are done, after an all-reduce of the statistics over DDP
  ranks, so ``trainer.devices=N`` gives the same maps as one device;
- the first epoch is RELION's seeding iteration: it reconstructs each replicate's consensus
  and from it the initial references (``init``);
- ``U`` replicates (``n_replicates`` or ``subsets``, :mod:`.membership`) are classified in the
  same pass over the data: each batch is read, transformed and CTF-evaluated once; the E-step
  is one vectorised computation over all (particle, replicate, class) triples;
- the whole model state is buffers (maps, noise spectra, priors, current sizes, last class of
  every particle, per-iteration history), so a run resumed from ``last.ckpt`` continues
  exactly; the M-step happens before validation and checkpointing.

``val/loss`` (what ModelCheckpoint monitors): the negative log marginal likelihood per Fourier
pixel, ``-log sum_k pi_k p(X | k) / |E|`` with its Gaussian normalisation, of the validation
particles under the references just computed; these particles never enter the maps, so it is
a held-out likelihood. With ``data.val_fraction=0`` (every particle classified, as RELION
does) it is the same quantity over the training particles during the iteration.

Prediction (:meth:`predict_step`): ``posterior`` ``(B, U * K)`` (the per-particle embedding;
zeros for replicates a particle is not in), ``class_number`` (argmax class of replicate 0,
0-based, -1 if not in it), ``max_prob`` (RELION's ``rlnMaxValueProbDistribution``) and, for
``U > 1``, the same per replicate. :meth:`state_maps` are the ``U * K`` class maps
(replicate-major) on the training box.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from hetero.models.base import HeteroModel
from hetero.models.class3d.backprojection import insertion_data
from hetero.models.class3d.diagnostics import (
    end_of_run_warning,
    replicate_diagnostics,
    view_tensor_entries,
)
from hetero.models.class3d.estep import (
    ExpectationState,
    batch_spectra,
    expectation,
    expectation_state,
    pair_rows,
    significant,
)
from hetero.models.class3d.history import HISTORY, history_shapes, iteration_record
from hetero.models.class3d.iteration import (
    Settings,
    check_options,
    initial_references,
    iterations_key,
    update_references,
)
from hetero.models.class3d.membership import build_membership, random_classes
from hetero.models.class3d.points import HalfPlanePoints
from hetero.models.class3d.statistics import (
    IterationStatistics,
    check_each_particle_once,
    merged_assignments,
)
from hetero.models.class3d.volumes import SolventMask
from hetero.models.components.renderer import has_ctf
from hetero.physics.ctf import ctf_table_compute
from hetero.utils.errors import ConfigError
from hetero.utils.pylogger import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)



class Class3D(HeteroModel):
    """Maximum-likelihood 3D classification (see the module docstring and the config file
    ``conf/model/class3d.yaml`` for every option and its RELION name)."""

    method = "class3d"
    embedding_name = "posterior"
    embedding_key = "posterior"
    labels_key = "class_number"
    label_name = "class"
    label_first = 1  # class_001 = rlnClassNumber 1, as RELION's run_class001.mrc
    can_decode = False
    #: The EM sufficient statistics of the running iteration live in plain attributes (the
    #: posterior-weighted backprojections are U x K x 2 padded volumes): a checkpoint is only
    #: consistent at an epoch (iteration) end, so ``last.ckpt`` is written only there.
    mid_epoch_checkpoints = False
    analysis_steps = ("hetero.analysis.steps.class3d.class3d",)
    #: The history holds NaN where a value does not exist (no E-step in the seeding iteration).
    nonfinite_buffers = HISTORY

    def __init__(
        self,
        box_size: int,
        apix: float,
        n_classes: int = 10,
        n_iterations: int = 30,
        tau2_fudge: float = 4.0,
        tau2_source: str = "power",
        class_resolution: str = "ssnr",
        strict_highres_exp: float = 10.0,
        ini_high: float = 60.0,
        do_map: bool = True,
        incr_size: int = 10,
        minres_map: int = 5,
        adaptive_fraction: float = 0.999,
        particle_diameter: float | None = None,
        width_mask_edge: float = 5.0,
        flatten_solvent: bool = True,
        solvent_mask: str | None = None,
        init: str = "random_subsets",
        init_perturbation: float = 0.1,
        min_class_particles: float = 1.0,
        n_replicates: int = 1,
        subsets=None,
        seed: int = 0,
        pad_factor: int = 2,
        accumulator_dtype: str = "float32",
        template_size: int | None = None,
        optimizer=None,
        scheduler=None,
        render_method: str = "fourier",
        **data_info,
    ) -> None:
        if template_size not in (None, box_size):
            raise ConfigError(f"model.template_size: class3d maps live on the training box ({box_size}), "
                             f"got {template_size}; leave it null (use data.box_size to resample)")
        super().__init__(box_size, apix, None, optimizer, scheduler, render_method, **data_info)
        check_options(init, tau2_source, class_resolution, accumulator_dtype, tau2_fudge, n_classes, n_iterations)
        n_particles = data_info.get("n_particles")
        if n_particles is None:
            raise ValueError("Class3D needs n_particles (the data module's info())")
        member = build_membership(int(n_particles), int(n_replicates), subsets)
        self.save_hyperparameters(ignore=["subsets", "optimizer", "scheduler"])
        # A subsets file is recorded; index arrays given in code live in the membership buffer.
        self.hparams["subsets"] = str(subsets) if isinstance(subsets, str | Path) else None
        d, u, k = self.box_size, member.shape[1], int(n_classes)
        self.n_classes, self.n_replicates = k, u
        self.n_iterations = int(n_iterations)
        self.cfg = Settings(d, self.apix, k, float(tau2_fudge), bool(do_map), float(ini_high), int(incr_size),
                            int(minres_map), init, float(init_perturbation), float(min_class_particles), int(seed),
                            tau2_source, class_resolution)
        self.strict_highres_exp = float(strict_highres_exp)
        self.adaptive_fraction = float(adaptive_fraction)
        self.pad_factor = int(pad_factor)
        self.accumulator_dtype = getattr(torch, accumulator_dtype)
        self.points = HalfPlanePoints(d)
        diameter = particle_diameter if particle_diameter else (d - width_mask_edge) * self.apix
        self.solvent = SolventMask(d, self.apix, float(diameter), float(width_mask_edge),
                                   solvent_mask if flatten_solvent else None, bool(flatten_solvent))
        n_shells = d // 2 + 1
        self.register_buffer("maps", torch.zeros(u, k, d, d, d))
        self.register_buffer("sigma2", torch.zeros(u, n_shells, dtype=torch.float64))
        self.register_buffer("prior", torch.full((u, k), 1.0 / k, dtype=torch.float64))
        self.register_buffer("radius", torch.full((u,), d // 2, dtype=torch.long))
        self.register_buffer("data_vs_prior", torch.zeros(u, k, n_shells, dtype=torch.float64))
        self.register_buffer("iteration", torch.tensor(0, dtype=torch.long))
        self.register_buffer("membership", member)
        # int8: N x U bytes, and a dtype every torch.distributed backend moves (gloo has no int16)
        self.register_buffer("assignment", torch.full(member.shape, -1, dtype=torch.int8))
        for name, shape in zip(HISTORY, history_shapes(u, k), strict=True):
            self.register_buffer(name, torch.zeros(0, *shape, dtype=torch.float64))
        self.register_buffer("image_mask", self.solvent.image_mask(), persistent=False)
        # DDP refuses a module without a trainable parameter; this one is never used.
        self._ddp_anchor = nn.Parameter(torch.zeros(1))
        self.automatic_optimization = False
        self._stats: IterationStatistics | None = None
        self._estate: tuple[int, ExpectationState, Tensor] | None = None
        self._version = 0
        self._pending = False
        self._new_assignment: Tensor | None = None
        self._epoch_logs: dict[str, float] = {}
        self._seen: Tensor | None = None
        self._val_seen = False
        self._logged = False

    # ------------------------------------------------------------------ interface
    def state_maps(self) -> Tensor:
        """``(K, D, D, D)`` class maps of replicate 0 (the classes of the labels and star file),
        voxel size :meth:`template_voxel_size`."""
        return self.maps[0].detach().float().cpu()

    def replicate_maps(self) -> Tensor:
        """``(U * K, D, D, D)`` class maps of every replicate, replicate-major."""
        return self.maps.detach().reshape(-1, *self.maps.shape[-3:]).float().cpu()

    def decode(self, z: Tensor) -> Tensor:
        raise NotImplementedError("class3d has no decoder: its maps are state_maps()")

    def configure_optimizers(self):
        return None

    # ------------------------------------------------------------------ E-step state
    def _expectation_state(self) -> tuple[ExpectationState, Tensor]:
        """The maps' half spectra and per-replicate weights (rebuilt when the state changes)."""
        if self._estate is None or self._estate[0] != self._version:
            strict = self.cfg.shell(self.strict_highres_exp) if self.strict_highres_exp > 0 else self.box_size // 2
            state = expectation_state(self.maps, self.sigma2, self.prior, self.radius, self.points, strict,
                                      self.pad_factor)
            self._estate = (self._version, *state)
        return self._estate[1], self._estate[2]

    def _batch_spectra(self, batch, n_points: int, keep_all: bool = False):
        return batch_spectra(batch, self.points, n_points, self.image_mask, self.pad_factor * self.box_size,
                             float(self.pad_factor), has_ctf(batch["ctf"]), keep_all)

    def _posteriors(self, batch, with_residual: bool = False):
        state, n_pixels = self._expectation_state()
        bs = self._batch_spectra(batch, state.shell.numel())
        pi, pu = pair_rows(self.membership[batch["index"]])
        out = expectation(bs, pi, pu, state, with_residual)
        return bs, pi, pu, out, n_pixels

    # ------------------------------------------------------------------ training (EM)
    def on_fit_start(self) -> None:
        if iterations_key(self.trainer, self.n_iterations) != "model.n_iterations":  # e.g. a resumed run extended
            log.warning("class3d: running trainer.max_epochs=%s EM iterations (one epoch is one iteration), not "
                        "model.n_iterations=%d; set model.n_iterations for a new run", self.trainer.max_epochs,
                        self.n_iterations)

    def on_train_epoch_start(self) -> None:
        first = int(self.iteration) == 0
        self._stats = IterationStatistics(
            self.n_replicates, self.n_classes, self.box_size, self.box_size // 2 + 1, self.pad_factor,
            self.device, consensus=first, n_mean_points=len(self.points) if first else 0,
            dtype=self.accumulator_dtype)
        self._new_assignment = torch.full_like(self.assignment, -1)
        self._seen = torch.zeros(self.membership.shape[0], dtype=torch.int32, device=self.device)
        self._val_seen = False
        self._pending = False
        self._logged = False
        self._epoch_logs = {}

    @torch.no_grad()
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        stats = self._stats
        self._seen.index_add_(0, batch["index"], torch.ones_like(batch["index"], dtype=torch.int32))
        with torch.autocast(self.device.type, enabled=False):
            ctf = (ctf_table_compute(batch["ctf"].float(), stats.ctf_size, batch["apix"].float())
                   if has_ctf(batch["ctf"]) else None)
            first = int(self.iteration) == 0
            # RELION backprojects only up to the current size (the first iteration's maps are
            # low-passed to ini_high anyway, and seeded classes are limited like later ones).
            r_max = int(self.radius.max()) if not first else self._first_radius()
            data = insertion_data(stats.template, batch["image"].float(), batch["rotation"].float(),
                                  -batch["origin_px"].float(), ctf, r_max)
            if first:
                self._seeding_step(batch, data)
            else:
                self._expectation_step(batch, data)
        self._pending = True

    def _first_radius(self) -> int:
        """Current size radius of the first iteration: from ``ini_high`` (RELION)."""
        cfg = self.cfg
        return min(cfg.nyquist, cfg.shell(cfg.ini_high) + cfg.incr_size) if cfg.ini_high > 0 else cfg.nyquist

    def _expectation_step(self, batch, data) -> None:
        stats, index = self._stats, batch["index"]
        bs, pi, pu, out, n_pixels = self._posteriors(batch, with_residual=True)
        post = out["posterior"]
        stats.backproject(data, significant(post, self.adaptive_fraction), pi, pu, batch["half"])
        # Beyond the E-step points the references are zero: the residual is the image power.
        r_set = int(self.radius.max())
        beyond = torch.arange(self.box_size // 2 + 1, device=self.device) > r_set
        residual = out["residual"] + torch.where(beyond, bs.power[pi], 0)
        best = post.argmax(-1)
        old = self.assignment[index[pi], pu].long()
        stats.add("class_weight", pu, post)
        stats.add("residual", pu, residual)
        stats.add("count", pu, torch.ones_like(pu, dtype=torch.float64))
        stats.add("loglik", pu, out["loglik"])
        stats.add("nll_per_pixel", pu, -out["loglik"] / n_pixels[pu])
        stats.add("pmax", pu, post.max(-1).values)
        stats.add("changes", pu, ((old >= 0) & (old != best)).double())
        stats.add("changes_scored", pu, (old >= 0).double())
        views = view_tensor_entries(batch["rotation"][pi])
        stats.add("views", pu, post.double()[:, :, None] * views[:, None, :])
        stats.add("views_all", pu, views)
        self._new_assignment[index[pi], pu] = best.to(torch.int8)

    def _seeding_step(self, batch, data) -> None:
        """First iteration: consensus (and random-subset) backprojections and image power."""
        stats = self._stats
        bs = self._batch_spectra(batch, 1, keep_all=True)
        pi, pu = pair_rows(self.membership[batch["index"]])
        stats.backproject(data, torch.ones_like(pi, dtype=torch.float32), pi, pu, batch["half"],
                          into_consensus=True)
        if self.cfg.init == "random_subsets":
            cls = torch.empty_like(pi)
            for u in torch.unique(pu).tolist():  # replicate u draws with seed + u
                sel = pu == u
                cls[sel] = random_classes(batch["index"][pi[sel]], self.cfg.seed + u, self.n_classes)
            weights = torch.nn.functional.one_hot(cls, self.n_classes).float()
            stats.backproject(data, weights, pi, pu, batch["half"])
            stats.add("class_weight", pu, weights)
            self._new_assignment[batch["index"][pi], pu] = cls.to(torch.int8)  # changes are from the seeds
        stats.add("count", pu, torch.ones_like(pu, dtype=torch.float64))
        stats.add("power", pu, bs.power[pi])
        stats.mean_spectrum.index_add_(0, pu, bs.x_all[pi].to(torch.complex128))

    # ------------------------------------------------------------------ M-step
    def on_validation_epoch_start(self) -> None:
        # Validation runs inside the training epoch, before on_train_epoch_end and before the
        # checkpoint is written: the M-step must come first.
        self._maximize()

    def on_validation_epoch_end(self) -> None:
        # The iteration's values are logged here when the epoch validates: the progress bar
        # refreshes at the validation end, while at the epoch end it refreshes before this
        # module's hook and would show the previous iteration's values.
        if not self.trainer.sanity_checking:
            self._log_iteration()

    def on_train_epoch_end(self) -> None:
        self._maximize()
        self._log_iteration()  # epochs without validation

    def _log_iteration(self) -> None:
        if self._logged or not self._epoch_logs:
            return
        self._logged = True
        logs = dict(self._epoch_logs)
        seen = torch.tensor([float(self._val_seen)], device=self.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(seen, op=torch.distributed.ReduceOp.MAX)  # one choice on every rank
        if not bool(seen.item()):
            logs["val/loss"] = logs.get("train/nll_per_pixel", math.inf)
        for name, value in logs.items():  # identical on every rank (reduced statistics)
            self.log(name, float(value), prog_bar=name in ("val/loss", "train/changes"), sync_dist=True)

    @torch.no_grad()
    def _maximize(self) -> None:
        if not self._pending:
            return
        self._pending = False
        stats, it = self._stats, int(self.iteration)
        trainer = self._trainer  # without one (direct use), the last iteration is n_iterations'
        last = (self.current_epoch + 1 >= trainer.max_epochs if trainer is not None and trainer.max_epochs is not None
                else it + 1 >= self.n_iterations)
        stats.all_reduce()
        check_each_particle_once(self._seen, getattr(getattr(self._trainer, "datamodule", None), "sampler", "?"))
        self.assignment.copy_(merged_assignments(self._new_assignment, self.assignment))
        npix = self.points.npix.to(self.device)
        if it == 0:
            refs = initial_references(stats, self.cfg, self.solvent, self.points.shell, npix)
        else:
            refs = update_references(stats, self.cfg, self.solvent, self.maps, self.radius, npix, it,
                                     reseed=not last, old_sigma2=self.sigma2)
        self._record(stats, refs, it, last)
        self.maps.copy_(refs.maps)
        self.sigma2.copy_(torch.where(npix > 0, refs.sigma2, self.sigma2) if it else refs.sigma2)
        self.prior.copy_(refs.prior)
        self.radius.copy_(refs.radius)
        self.data_vs_prior.copy_(refs.data_vs_prior)
        self.iteration += 1
        self._version += 1
        self._stats = None
        for message in refs.messages:
            log.info(message)

    def _record(self, stats: IterationStatistics, refs, it: int, last: bool) -> None:
        """Append this iteration to the history buffers, prepare the epoch's log values and,
        after an E-step, the signs of degenerate classes (:mod:`.diagnostics`; warned once, after
        the last iteration)."""
        row, logs = iteration_record(stats, refs, it, self.cfg.init, self.box_size, self.apix, self.device)
        for name, value in row.items():
            setattr(self, name, torch.cat([getattr(self, name), value[None]]))
        if it > 0:
            facts, values = replicate_diagnostics(refs.maps, stats.sums, self.radius)
            logs.update(values)
            key = iterations_key(self._trainer, self.n_iterations)
            warning = end_of_run_warning(facts, row["hist_changes"], key) if last else None
            if warning:
                log.warning(warning)
        self._epoch_logs = logs

    # ------------------------------------------------------------------ validation / prediction
    @torch.no_grad()
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if int(self.iteration) == 0:
            return
        with torch.autocast(self.device.type, enabled=False):
            _, pi, pu, out, n_pixels = self._posteriors(batch)
        if pi.numel() == 0:
            return
        nll = (-out["loglik"] / n_pixels[pu]).mean()
        self._val_seen = True
        self.log("val/loss", float(nll), prog_bar=True, on_epoch=True, sync_dist=True, batch_size=int(pi.numel()))

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Tensor], batch_idx: int = 0) -> dict[str, Tensor]:
        """Posteriors of every particle of the batch (see the module docstring)."""
        if int(self.iteration) == 0:
            raise RuntimeError("class3d has not completed an iteration: train it first")
        b, u, k = batch["index"].shape[0], self.n_replicates, self.n_classes
        with torch.autocast(self.device.type, enabled=False):
            _, pi, pu, out, _ = self._posteriors(batch)
        post = torch.zeros(b, u, k, device=self.device)
        post[pi, pu] = out["posterior"]
        cls = torch.full((b, u), -1, dtype=torch.long, device=self.device)
        cls[pi, pu] = out["posterior"].argmax(-1)
        pmax = torch.zeros(b, u, device=self.device)
        pmax[pi, pu] = out["posterior"].max(-1).values
        res = {"index": batch["index"], "posterior": post.reshape(b, u * k), "class_number": cls[:, 0],
               "max_prob": pmax[:, 0]}
        if u > 1:
            res.update(replicate_class=cls, replicate_max_prob=pmax)
        return res

    @torch.no_grad()
    def encode(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The posteriors as the per-particle latent of the generic inference pass."""
        post = self.predict_step(batch)["posterior"]
        return {"z_mu": post, "z_logstd": torch.zeros_like(post)}

    # ------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # The history grows by one row per iteration: take the checkpoint's length.
        for name in HISTORY:
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=self.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._version += 1
