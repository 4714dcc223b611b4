"""Resolution gain of DynaMight's deformed backprojection over the rigid one, with the TRUE motion.

On the built-in continuous hinge set (the arm swings through ``hinge_range_deg`` with the hinge
parameter ``t``), the deformation of every particle is the true one (consensus = the molecule at
``t = 0.5``; deformed = the molecule at the particle's ``t``): an upper bound of what learnt
deformations can give, and a check of the backprojection itself. Reported, for the deformed and
the rigid backprojection of the same particles (each half set its own particles):

- half-map FSC=0.143 resolution (Å), unmasked and with a soft mask from the true consensus
  (masked: corrected by phase randomisation as ``relion_postprocess``; uncorrected beside it);
- FSC=0.5 against the true structure in the consensus conformation, and its mean over shells,
  inside the moving domain (mask from the ground-truth arm) and in the rest.

Example usage (box 32: ~1 min per SNR on 2 cores; box 64 at 3 Å/px, 5,000 particles: ~6 min)::

    python benchmarks/bench_dynamight_gain.py --snr 1.0 0.05 0.01 --particles 2000 --box 32 --apix 5.0
    python benchmarks/bench_dynamight_gain.py --snr 0.05 0.01 --particles 5000 --box 64 --apix 3.0 --out docs/bench_dynamight_gain.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch
from _common import machine

from hetero.analysis.resolution import half_map_resolution
from hetero.data.datamodule import ParticleDataModule
from hetero.data.synthetic import PseudoAtomMolecule, SyntheticDataset, load_truth, rasterize
from hetero.models.dynamight.backprojection import make_regions, reconstruct_half_maps
from hetero.models.dynamight.backprojection_step import backproject_halves
from hetero.physics.fsc import fsc, fsc_resolution
from hetero.physics.masks import soft_mask_from_volume


class Oracle:
    """The true hinge deformation of every particle (Å from the box centre)."""

    def __init__(self, ds, t: np.ndarray) -> None:
        self.mol = PseudoAtomMolecule(seed=ds.molecule_seed)
        self.t, self.range = t, ds.hinge_range_deg
        self.rest = torch.as_tensor(self.mol.hinge_coords(0.5, self.range)).float()

    def __call__(self, index: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(self.mol.hinge_coords(self.t[index], self.range)).float()


def measure(snr: float, n: int, box: int, apix: float, regions: int, cache: Path, seed: int = 0) -> dict:
    ds = SyntheticDataset(kind="continuous", n_particles=n, box_size=box, pixel_size_angstrom=apix,
                          snr=snr, seed=seed, cache_dir=str(cache))
    ds.ensure()
    with tempfile.TemporaryDirectory() as tmp:
        dm = ParticleDataModule(ds.star_path, box_size=box, num_workers=0, persistent_workers=False,
                                sampler="random", batch_size=16, norm_sample_size=50,
                                split_file=str(Path(tmp) / "split.npz"))
        dm.prepare_data()
        dm.setup("predict")
        t = np.asarray(load_truth(ds.truth_dir)["t"]).reshape(n, -1)[:, 0]
        orc = Oracle(ds, t)
        reg = make_regions(orc.rest, regions)
        sums = backproject_halves(lambda b: dm.predict_dataloader(original_size=True, batches=b),
                                  dm.table.half_set, [orc, orc], [reg, reg], box, 64)
    maps = {"deformed": reconstruct_half_maps(sums["deformed"], reg.weights(box, apix)),
            "rigid": reconstruct_half_maps(sums["rigid"], torch.ones(1, box, box, box))}
    coords = orc.rest.double().numpy()
    sigma = ds.atom_sigma_angstrom
    ref = rasterize(coords, box, apix, sigma)
    arm_vol = rasterize(coords[orc.mol.domain_mask("arm")], box, apix, sigma)
    full_mask = soft_mask_from_volume(ref, 0.1 * float(ref.max()), 2, 4)
    arm_mask = soft_mask_from_volume(arm_vol, 0.1 * float(arm_vol.max()), 2, 4)
    masks = {"unmasked": None, "molecule": full_mask, "arm": arm_mask, "rest": full_mask * (1 - arm_mask)}
    out = {"snr": snr, "particles": n, "box": box, "apix": apix, "regions": regions}
    for kind, m in maps.items():
        full = (m["half1"] + m["half2"]) / 2
        row = {}
        for name, mask in masks.items():
            # masked: RELION's phase-randomisation correction (a tight mask alone correlates the
            # half maps up to Nyquist); the uncorrected value is kept beside it
            half = half_map_resolution(m["half1"], m["half2"], apix, mask)
            key = "unmasked" if mask is None else "masked"
            truth = fsc(full, ref, mask)
            row[name] = {"half_map_res_0.143": half[f"res_0.143_{key}"],
                         "half_map_res_0.143_uncorrected": half["res_0.143_unmasked" if mask is None
                                                                else "res_0.143_masked_uncorrected"],
                         "truth_res_0.5": fsc_resolution(truth, box, apix, 0.5),
                         "truth_fsc_mean": float(truth[1:].mean())}
        out[kind] = row
    out["gain_0.143_unmasked_angstrom"] = (out["rigid"]["unmasked"]["half_map_res_0.143"]
                                           - out["deformed"]["unmasked"]["half_map_res_0.143"])
    out["gain_0.143_molecule_mask_angstrom"] = (out["rigid"]["molecule"]["half_map_res_0.143"]
                                                - out["deformed"]["molecule"]["half_map_res_0.143"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--snr", type=float, nargs="+", default=[1.0])
    parser.add_argument("--particles", type=int, default=2000)
    parser.add_argument("--box", type=int, default=32)
    parser.add_argument("--apix", type=float, default=5.0)
    parser.add_argument("--regions", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "hetero-bench-gain")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    for snr in args.snr:
        record = {"date": str(date.today()), "commit": commit, "threads": args.threads, "machine": machine(),
                  **measure(snr, args.particles, args.box, args.apix, args.regions, args.cache)}
        print(json.dumps(record, indent=1), flush=True)
        if args.out is not None:
            runs = json.loads(args.out.read_text()) if args.out.is_file() else []
            args.out.write_text(json.dumps([*runs, record], indent=1) + "\n")


if __name__ == "__main__":
    main()
