"""RELION 3.1.3 ``relion_postprocess`` FSC curves on small deterministic half maps.

Writes the fixture ``tests/physics/data/relion_postprocess_fsc.csv`` that
``tests/physics/test_phase_randomisation.py`` compares :func:`hetero.analysis.resolution.
half_map_resolution` against (the test regenerates the same half maps and mask with
:func:`make_half_maps`, needs no RELION). Needs ``relion_postprocess`` on PATH
(``apt-get install relion`` gives 3.1.3)::

    PYTHONPATH=src python benchmarks/relion_postprocess_fsc.py            # rewrite the fixture
    PYTHONPATH=src python benchmarks/relion_postprocess_fsc.py --compare  # also print ours beside it

The maps: ``n_blobs`` Gaussian blobs (numpy PCG64, seed 11) inside a ball, the same signal in
both halves plus independent white noise per half (seeds 12, 13); the mask a soft ellipsoid
(raised-cosine edge) tighter than the molecule on one axis, so the masked FSC is inflated at
high shells and RELION's phase-randomisation correction matters. Everything is float64 numpy
cast to float32, so the maps are bit-identical on any machine with numpy >= 1.17.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

BOX = 48
APIX = 2.0
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "physics" / "data" / "relion_postprocess_fsc.csv"
COLUMNS = (
    "rlnFourierShellCorrelationUnmaskedMaps",
    "rlnFourierShellCorrelationMaskedMaps",
    "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps",
    "rlnFourierShellCorrelationCorrected",
)


def make_half_maps(box: int = BOX, n_blobs: int = 60, noise: float = 0.4):
    """``(half1, half2, mask)``, each ``(box, box, box)`` float32 numpy, deterministic.

    Blobs: centres uniform in a ball of radius ``0.28 box`` px, sigma 1.0-2.2 px, weights
    0.5-1.5; noise: white Gaussian of std ``noise`` x the signal's std, independent per half.
    Mask: ellipsoid semi-axes ``(0.22, 0.30, 0.30) box`` px (z, y, x), 3 px raised-cosine edge.
    """
    rng = np.random.default_rng(11)
    c = box // 2
    z, y, x = np.meshgrid(*(np.arange(box, dtype=np.float64) - c,) * 3, indexing="ij")
    signal = np.zeros((box,) * 3)
    for _ in range(n_blobs):
        while True:
            p = rng.uniform(-1, 1, 3)
            if (p**2).sum() <= 1:
                break
        p = p * 0.28 * box
        s = rng.uniform(1.0, 2.2)
        w = rng.uniform(0.5, 1.5)
        signal += w * np.exp(-((z - p[0]) ** 2 + (y - p[1]) ** 2 + (x - p[2]) ** 2) / (2 * s * s))
    sd = noise * signal.std()
    half1 = signal + sd * np.random.default_rng(12).standard_normal(signal.shape)
    half2 = signal + sd * np.random.default_rng(13).standard_normal(signal.shape)
    r = np.sqrt((z / 0.22) ** 2 + (y / 0.30) ** 2 + (x / 0.30) ** 2) / box  # 1 on the ellipsoid
    edge = 3.0 / (0.22 * box)  # ~3 px along the short axis, in units of r
    t = np.clip((r - 1.0) / edge, 0.0, 1.0)
    mask = 0.5 * (1 + np.cos(np.pi * t))
    return half1.astype(np.float32), half2.astype(np.float32), mask.astype(np.float32)


def run_relion(workdir: Path) -> dict[str, np.ndarray]:
    """Write the maps, run ``relion_postprocess`` (no sharpening) and return its FSC columns
    and ``randomize_at`` line."""
    import mrcfile
    import starfile

    h1, h2, m = make_half_maps()
    for name, vol in (("half1_class001_unfil.mrc", h1), ("half2_class001_unfil.mrc", h2), ("mask.mrc", m)):
        with mrcfile.new(workdir / name, overwrite=True) as f:
            f.set_data(vol)
            f.voxel_size = APIX
    cmd = ["relion_postprocess", "--i", str(workdir / "half1_class001_unfil.mrc"),
           "--i2", str(workdir / "half2_class001_unfil.mrc"), "--mask", str(workdir / "mask.mrc"),
           "--angpix", str(APIX), "--adhoc_bfac", "0", "--randomize_at_fsc", "0.8",
           "--random_seed", "0", "--o", str(workdir / "postprocess")]
    log = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    table = starfile.read(workdir / "postprocess.star")["fsc"]
    out = {k: table[k].to_numpy() for k in ("rlnSpectralIndex", *COLUMNS)}
    out["log"] = log
    return out


def write_fixture(res: dict, path: Path = FIXTURE) -> None:
    version = subprocess.run(["relion_postprocess", "--version"], capture_output=True, text=True).stdout
    version = " ".join(version.split())
    lines = [f"# relion_postprocess ({version}) on benchmarks/relion_postprocess_fsc.py:make_half_maps(),",
             f"# box {BOX}, {APIX} A/px, --randomize_at_fsc 0.8 --random_seed 0 --adhoc_bfac 0",
             ",".join(("shell", *COLUMNS))]
    for i, k in enumerate(res["rlnSpectralIndex"]):
        lines.append(",".join([str(int(k)), *(f"{res[c][i]:.6f}" for c in COLUMNS)]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def compare(res: dict) -> None:
    """Print RELION's curves beside ``half_map_resolution``'s (same maps, same mask)."""
    import torch

    from hetero.analysis.resolution import half_map_resolution

    h1, h2, m = (torch.from_numpy(a) for a in make_half_maps())
    ours = half_map_resolution(h1, h2, APIX, m, seed=0)
    print("randomise_from_shell (ours):", ours["randomise_from_shell"])
    print("shell  relU    ourU   relM    ourM   relR    ourR   relC    ourC")
    for i in range(len(res["rlnSpectralIndex"])):
        print(f"{i:5d} " + " ".join(f"{res[c][i]:7.4f} {ours[k][i]:7.4f}" for c, k in zip(
            COLUMNS, ("fsc_unmasked", "fsc_masked_uncorrected", "fsc_phase_randomised", "fsc_masked"))))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", action="store_true", help="print our curves beside RELION's")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite the fixture")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        res = run_relion(Path(tmp))
    print("\n".join(line for line in res["log"].splitlines() if "randomize" in line.lower()
                    or "FINAL RESOLUTION" in line))
    if not args.no_write:
        write_fixture(res)
        print("wrote", FIXTURE)
    if args.compare:
        compare(res)


if __name__ == "__main__":
    sys.exit(main())
