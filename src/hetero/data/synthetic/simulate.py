"""Synthetic particle datasets with ground truth: the framework's default data.

:class:`SyntheticDataset` renders the pseudo-atom molecule of
:mod:`hetero.data.synthetic.molecule` in discrete, continuous or compositional states at
uniformly random poses, applies a RELION CTF with a B-factor envelope and a random shift, adds
white Gaussian noise at a target SNR and writes a RELION 3.1 dataset plus its ground truth into
a cache folder. It takes only plain values, so Hydra builds it from ``conf/data/synthetic.yaml``;
the data module calls :meth:`SyntheticDataset.ensure` to get the ``.star`` path (generated once,
then reused).

Image formation (conventions of :mod:`hetero.physics.conventions`, white density)::

    clean_i = translate(CTF_i * P_{A_i} V_{state(i)}, t_i),   t_i = -origin_i   (RELION sign)
    image_i = clean_i / sigma + n_i,                           n_i ~ N(0, 1) white, per pixel

``P_A V`` is the exact projection of the Gaussian pseudo-atoms (the analytic line integral of
the map :func:`~hetero.data.synthetic.molecule.rasterize` writes, sampled at pixel centres;
it agrees with :func:`hetero.physics.projection.project_real` of that map to ~1.5 %). ``CTF_i``
is :func:`hetero.physics.ctf.compute_ctf` *including* a per-particle B-factor envelope
``exp(-B s^2 / 4)`` that is **not** written to the star file (the envelope is part of the
unknown signal decay, as in real data; it is in ``truth.npz``). The CTF is applied on the
``D`` box without padding, like :func:`hetero.physics.projection.render`.

SNR definitions (both recorded in ``truth.json`` / ``truth.npz``):

* ``snr_box`` (the target ``snr``, CryoBench's definition): variance of the noiseless
  CTF-modulated images pooled over all pixels of the whole box and all particles, divided by
  the noise variance. ``sigma`` is chosen after a first pass over the clean images so that the
  written data meet the target exactly.
* ``snr_masked``: the same, over the particle footprint only (pixels where the CTF-free
  projection exceeds 2 % of its maximum); about ``snr_box / (footprint fraction)``.

Files in :attr:`SyntheticDataset.truth_dir` (``<cache_dir>/<name>/``):

=================== ==========================================================================
``particles.mrcs``  ``(N, D, D)`` float32 stack, noise standard deviation 1
``particles.star``  RELION 3.1 (optics + particles; poses, origins in Å, CTF, rlnRandomSubset)
``state_XX.mrc``    ground-truth map of state ``XX`` (``D^3``, same pixel size); for the
                    continuous kind the maps at the centres ``t_grid`` of ``n_states`` bins of t
``truth.npz``       per-particle truth: ``labels``, ``t`` (continuous), ``rotations``,
                    ``origins_px``, ``shifts_px``, CTF parameters, ``b_factor``, ``half_set``,
                    clean-signal statistics, ``noise_sigma``, ``image_scale``, SNRs
``truth.json``      human-readable summary (kind, sizes, SNRs, states, counts, parameters,
                    generator version)
=================== ==========================================================================

The drawing, rendering and writing are in :mod:`hetero.data.synthetic.generation`,
:func:`load_truth` in :mod:`hetero.data.synthetic.truth`.

Example usage::

    ds = SyntheticDataset(kind="discrete", n_particles=5000, seed=0)
    star = ds.ensure()                      # generated on first use (~10 s), then cached
    truth = load_truth(ds.truth_dir)        # labels (N,), volumes (K, D, D, D), apix, ...
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hetero.data.synthetic.molecule import (
    PseudoAtomMolecule,
    default_atom_sigma,
    project_atoms,
)
from hetero.data.synthetic.truth import load_truth
from hetero.physics.ctf import compute_ctf
from hetero.physics.fourier import fft2_centered, ifft2_centered

# Plain logging: generating data must not import Lightning (RankedLogger does, lazily).
log = logging.getLogger(__name__)

__all__ = ["GENERATOR_VERSION", "KINDS", "SyntheticDataset", "default_cache_dir", "load_truth"]

#: Bumped whenever the generated data change for the same parameters (part of the cache key).
GENERATOR_VERSION = 1
KINDS = ("discrete", "continuous", "compositional")
#: Default number of states (discrete), bins of t (continuous) and domain subsets (compositional).
DEFAULT_N_STATES = {"discrete": 8, "continuous": 8, "compositional": 4}
#: Footprint threshold of ``snr_masked``: fraction of the CTF-free projection's maximum.
MASK_THRESHOLD = 0.02
STAR_NAME = "particles.star"
STACK_NAME = "particles.mrcs"


def default_cache_dir() -> Path:
    """``$HETERO_CACHE_DIR/synthetic`` or ``~/.cache/hetero/synthetic``."""
    root = os.environ.get("HETERO_CACHE_DIR") or str(Path.home() / ".cache" / "hetero")
    return Path(root) / "synthetic"


class SyntheticDataset:
    """A cached synthetic dataset with ground truth (see module docstring).

    :param kind: ``"discrete"`` (rigid-body domain rearrangements), ``"continuous"`` (hinge
        motion of the arm, ``t ~ U[0, 1]`` -> ``t * hinge_range_deg``) or ``"compositional"``
        (subsets of domains present).
    :param n_particles: number of images ``N``.
    :param box_size: image side ``D`` (pixels). :param pixel_size_angstrom: Å/pixel.
    :param n_states: discrete states / continuous bins / compositional subsets (``None``: 8, 8, 4).
        Particles are split evenly between states (discrete, compositional), in random order.
    :param snr: target ``snr_box`` (whole-box signal variance / noise variance); ``None`` writes
        noiseless images scaled to unit signal variance.
    :param defocus_min_angstrom, defocus_max_angstrom: range of the mean defocus (uniform, Å).
    :param astigmatism_max_angstrom: ``dU - dV`` is uniform in ``[0, this]``, angle uniform in
        ``[0, 180)`` degrees.
    :param voltage_kv, spherical_aberration_mm, amplitude_contrast: optics (RELION units).
    :param b_factor_min, b_factor_max: per-particle B-factor envelope, uniform (Å^2); not in the star.
    :param shift_sigma_px: standard deviation of the translation ``t`` per axis (pixels); RELION
        origins are ``-t``.
    :param hinge_range_deg: arm rotation at ``t = 1`` (continuous kind).
    :param atom_sigma_angstrom: pseudo-atom width (Å); ``None``: ``max(2.5, apix)``.
    :param molecule_seed: seed of the molecule's atom layout (the same molecule for every dataset
        by default). :param seed: seed of everything per-particle (states, poses, CTF, shifts,
        half sets, noise).
    :param cache_dir: parent folder of the datasets (``None``: :func:`default_cache_dir`).
    :param name: folder name; ``None`` derives ``<kind>-n<N>-d<D>-<hash of all parameters>``.
        An existing folder of that name made with other parameters is an error.
    :param chunk_size: particles simulated at a time (bounds memory; does not change the data).
    """

    def __init__(
        self,
        kind: str = "discrete",
        n_particles: int = 5000,
        box_size: int = 64,
        pixel_size_angstrom: float = 3.0,
        n_states: int | None = None,
        snr: float | None = 0.05,
        defocus_min_angstrom: float = 10000.0,
        defocus_max_angstrom: float = 25000.0,
        astigmatism_max_angstrom: float = 500.0,
        voltage_kv: float = 300.0,
        spherical_aberration_mm: float = 2.7,
        amplitude_contrast: float = 0.1,
        b_factor_min: float = 50.0,
        b_factor_max: float = 150.0,
        shift_sigma_px: float = 2.0,
        hinge_range_deg: float = 60.0,
        atom_sigma_angstrom: float | None = None,
        molecule_seed: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        name: str | None = None,
        chunk_size: int = 256,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if int(n_particles) < 1 or int(box_size) < 8:
            raise ValueError(f"need n_particles >= 1 and box_size >= 8, got {n_particles}, {box_size}")
        if snr is not None and not float(snr) > 0:
            raise ValueError(f"snr must be > 0 (or None for noiseless images), got {snr}")
        if defocus_max_angstrom < defocus_min_angstrom:
            raise ValueError("defocus_max_angstrom must be >= defocus_min_angstrom")
        self.kind = kind
        self.n_particles = int(n_particles)
        self.box_size = int(box_size)
        self.pixel_size_angstrom = float(pixel_size_angstrom)
        self.n_states = int(n_states) if n_states is not None else DEFAULT_N_STATES[kind]
        self.snr = None if snr is None else float(snr)
        self.defocus_min_angstrom = float(defocus_min_angstrom)
        self.defocus_max_angstrom = float(defocus_max_angstrom)
        self.astigmatism_max_angstrom = float(astigmatism_max_angstrom)
        self.voltage_kv = float(voltage_kv)
        self.spherical_aberration_mm = float(spherical_aberration_mm)
        self.amplitude_contrast = float(amplitude_contrast)
        self.b_factor_min = float(b_factor_min)
        self.b_factor_max = float(b_factor_max)
        self.shift_sigma_px = float(shift_sigma_px)
        self.hinge_range_deg = float(hinge_range_deg)
        self.atom_sigma_angstrom = float(
            default_atom_sigma(pixel_size_angstrom) if atom_sigma_angstrom is None else atom_sigma_angstrom
        )
        self.molecule_seed = int(molecule_seed)
        self.seed = int(seed)
        self.chunk_size = max(1, int(chunk_size))
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.name = name or f"{kind}-n{self.n_particles}-d{self.box_size}-{self.param_hash()}"
        #: the dataset folder (particles, ground truth); exists after :meth:`ensure`.
        self.truth_dir = str(self.cache_dir / self.name)

    # -- identity -------------------------------------------------------------------------------
    @property
    def params(self) -> dict:
        """Every parameter that affects the generated files (plus the generator version)."""
        return {
            "generator_version": GENERATOR_VERSION,
            "kind": self.kind,
            "n_particles": self.n_particles,
            "box_size": self.box_size,
            "pixel_size_angstrom": self.pixel_size_angstrom,
            "n_states": self.n_states,
            "snr": self.snr,
            "defocus_min_angstrom": self.defocus_min_angstrom,
            "defocus_max_angstrom": self.defocus_max_angstrom,
            "astigmatism_max_angstrom": self.astigmatism_max_angstrom,
            "voltage_kv": self.voltage_kv,
            "spherical_aberration_mm": self.spherical_aberration_mm,
            "amplitude_contrast": self.amplitude_contrast,
            "b_factor_min": self.b_factor_min,
            "b_factor_max": self.b_factor_max,
            "shift_sigma_px": self.shift_sigma_px,
            "hinge_range_deg": self.hinge_range_deg,
            "atom_sigma_angstrom": self.atom_sigma_angstrom,
            "molecule_seed": self.molecule_seed,
            "seed": self.seed,
        }

    def param_hash(self) -> str:
        """First 10 hex digits of the SHA-1 of :attr:`params` (canonical JSON)."""
        blob = json.dumps(self.params, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:10]

    @property
    def star_path(self) -> str:
        """Path of the ``.star`` file (exists after :meth:`ensure`)."""
        return str(Path(self.truth_dir) / STAR_NAME)

    def __repr__(self) -> str:
        return f"SyntheticDataset({self.kind}, n={self.n_particles}, box={self.box_size}, dir={self.truth_dir})"

    # -- generation -----------------------------------------------------------------------------
    def ensure(self) -> str:
        """Path of ``particles.star``, generating the dataset first if it is not cached.

        Generation writes into a temporary sibling folder that is renamed into place at the end,
        so the dataset folder is either complete or absent; if another process finishes the same
        dataset first, its folder is used and ours is discarded.

        :raises ValueError: the folder exists but was made with other parameters (or is not a
            complete synthetic dataset).
        """
        final = Path(self.truth_dir)
        if self._is_complete(final):
            return self.star_path
        if final.exists():
            raise ValueError(
                f"{final} exists but is not a complete synthetic dataset (no truth.json); "
                "delete it or choose another name"
            )
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.name}.tmp-", dir=self.cache_dir))
        try:
            start = time.perf_counter()
            self.generate(tmp)
            _apply_umask(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not self._is_complete(final):
                    raise
                log.info("synthetic dataset %s was generated concurrently; using that copy", final)
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                log.info(
                    "generated synthetic %s dataset (%d particles, box %d) in %.1f s: %s",
                    self.kind, self.n_particles, self.box_size, time.perf_counter() - start, final,
                )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.star_path

    def _remove_stale_temporaries(self, max_age_s: float = 86400.0) -> None:
        """Delete temporary folders of this dataset left by killed processes (older than a day)."""
        now = time.time()
        for tmp in self.cache_dir.glob(f".{self.name}.tmp-*"):
            try:
                if now - tmp.stat().st_mtime > max_age_s:
                    shutil.rmtree(tmp, ignore_errors=True)
            except OSError:
                pass

    def _is_complete(self, folder: Path) -> bool:
        summary = folder / "truth.json"
        if not summary.is_file():
            return False
        stored = json.loads(summary.read_text()).get("params", {})
        if stored != json.loads(json.dumps(self.params)):
            diff = sorted(k for k in set(stored) | set(self.params) if stored.get(k) != self.params.get(k))
            raise ValueError(
                f"{folder} holds a synthetic dataset made with other parameters (differs in "
                f"{', '.join(diff)}); delete it or choose another name"
            )
        return True

    def states(self, molecule: PseudoAtomMolecule | None = None):
        """Atom coordinates and weights of the ground-truth maps.

        :return: ``coords (K, M, 3)`` Å, ``weights (K, M)``, per-state descriptions, ``t_grid``
            (``(K,)`` bin centres for the continuous kind, else ``None``).
        """
        mol = molecule or PseudoAtomMolecule(self.molecule_seed)
        if self.kind == "discrete":
            coords, weights, info = mol.discrete_states(self.n_states)
            return coords, weights, info, None
        if self.kind == "compositional":
            coords, weights, info = mol.compositional_states(self.n_states)
            return coords, weights, info, None
        t_grid = (np.arange(self.n_states) + 0.5) / self.n_states
        coords = mol.hinge_coords(t_grid, self.hinge_range_deg)
        info = [{"state": i, "t": float(t), "arm_deg": float(t * self.hinge_range_deg)} for i, t in enumerate(t_grid)]
        return coords, np.ones(coords.shape[:2]), info, t_grid

    def _check_fit(self, coords: np.ndarray) -> None:
        radius = float(np.linalg.norm(coords, axis=-1).max()) + 2 * self.atom_sigma_angstrom
        half_box = self.box_size // 2 * self.pixel_size_angstrom
        if radius > half_box:
            from hetero.utils.errors import ConfigError

            raise ConfigError(
                f"the molecule (radius {radius:.0f} Å incl. 2 sigma) does not fit in a box of "
                f"{self.box_size} x {self.pixel_size_angstrom} Å; use data.particles.box_size * "
                "data.particles.pixel_size_angstrom (data.box_size only sets the training box) "
                f">= {2 * radius + 4 * self.shift_sigma_px * self.pixel_size_angstrom:.0f} Å"
            )
        if radius + 3 * self.shift_sigma_px * self.pixel_size_angstrom > half_box:
            log.warning(
                "the synthetic molecule (radius %.0f Å incl. 2 sigma) plus 3 shift sigmas exceeds the "
                "half box (%.0f Å): particles shifted furthest are cut at the box edge", radius, half_box,
            )

    def clean_images(self, truth: dict, indices: np.ndarray, molecule: PseudoAtomMolecule | None = None):
        """Noiseless images (volume units, before scaling by ``image_scale``) and footprints.

        :param truth: the per-particle parameters (as in ``truth.npz``).
        :param indices: ``(B,)`` particle indices.
        :return: ``(clean (B, D, D), footprint (B, D, D) bool)`` float32 / bool tensors.
        """
        mol = molecule or PseudoAtomMolecule(self.molecule_seed)
        idx = np.asarray(indices)
        d, apix = self.box_size, self.pixel_size_angstrom
        if self.kind == "continuous":
            coords = torch.as_tensor(mol.hinge_coords(truth["t"][idx], self.hinge_range_deg))
            weights = None
        else:
            state_coords, state_weights, _, _ = self.states(mol)
            lab = truth["labels"][idx]
            coords = torch.as_tensor(state_coords[lab])
            weights = None if self.kind == "discrete" else torch.as_tensor(state_weights[lab])
        rot = torch.as_tensor(truth["rotations"][idx], dtype=torch.float32)
        proj = project_atoms(
            coords, rot, d, apix, self.atom_sigma_angstrom, weights,
            shifts_px=torch.as_tensor(truth["shifts_px"][idx], dtype=torch.float32),
        )
        ctf = compute_ctf(
            d, apix,
            torch.as_tensor(truth["defocus_u_angstrom"][idx], dtype=torch.float32),
            torch.as_tensor(truth["defocus_v_angstrom"][idx], dtype=torch.float32),
            torch.as_tensor(truth["defocus_angle_deg"][idx], dtype=torch.float32),
            self.voltage_kv, self.spherical_aberration_mm, self.amplitude_contrast,
            b_factor=torch.as_tensor(truth["b_factor"][idx], dtype=torch.float32),
        )
        clean = ifft2_centered(fft2_centered(proj) * ctf).real
        footprint = proj > MASK_THRESHOLD * proj.amax(dim=(-2, -1), keepdim=True)
        return clean, footprint

    def generate(self, folder: str | Path) -> None:
        """Write the dataset into ``folder`` (which must exist); see the module docstring."""
        from hetero.data.synthetic.generation import write_dataset

        mol = PseudoAtomMolecule(self.molecule_seed)
        states = self.states(mol)
        coords = states[0]
        self._check_fit(coords if self.kind != "continuous" else mol.hinge_coords(np.linspace(0, 1, 9), self.hinge_range_deg))
        write_dataset(self, Path(folder), mol, states)


def _apply_umask(folder: Path) -> None:
    """Give ``folder`` (made 0700 by ``mkdtemp``) and its files the usual umask permissions."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~mask)
