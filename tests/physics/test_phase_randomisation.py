"""Phase randomisation beyond a shell and RELION's corrected masked FSC (Chen et al. 2013).

The RELION fixture ``tests/physics/data/relion_postprocess_fsc.csv`` holds the FSC columns of
``relion_postprocess`` (RELION 3.1.3) on the half maps and mask that
``benchmarks/relion_postprocess_fsc.py:make_half_maps`` builds (numpy, seeded: bit-identical
here). Regenerate it with ``PYTHONPATH=src python benchmarks/relion_postprocess_fsc.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from hetero.analysis.resolution import half_map_resolution
from hetero.physics.fourier import (
    fft3_centered,
    ifft3_centered,
    radius_grid,
    randomise_phases_beyond,
)
from hetero.physics.fsc import fsc, fsc_corrected, randomise_from_shell
from hetero.physics.masks import spherical_mask

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).parent / "data" / "relion_postprocess_fsc.csv"


def _noise(size: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn((size,) * 3, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("size", [32, 31])
def test_randomisation_keeps_amplitudes_and_low_shells_and_decorrelates_beyond(size):
    v = _noise(size, 0) * spherical_mask(size, size / 3, 3).double() + 0.1 * _noise(size, 1)
    cut = 7
    out = randomise_phases_beyond(v, cut, torch.Generator().manual_seed(3))
    assert out.shape == v.shape and out.dtype == torch.float64 and not out.is_complex()
    fv, fo = fft3_centered(v), fft3_centered(out)
    # |F| kept everywhere: had the new spectrum not been Hermitian, taking .real would change it.
    torch.testing.assert_close(fo.abs(), fv.abs(), atol=1e-9, rtol=1e-9)
    below = radius_grid((size,) * 3, dtype=torch.float64) < cut - 0.5  # shells round|k| < cut
    torch.testing.assert_close(fo[below], fv[below], atol=1e-9, rtol=1e-9)
    curve = fsc(v, out)
    assert torch.allclose(curve[:cut], torch.ones(cut), atol=1e-6)
    beyond = curve[cut + 1 :]
    assert beyond.abs().mean() < 0.05 and beyond.abs().max() < 0.2, beyond
    # the random phases differ from the map's own: |F' - F|^2 ~ 2 |F|^2 beyond the cut
    far = radius_grid((size,) * 3, dtype=torch.float64) > cut + 0.5
    ratio = (fo - fv)[far].abs().pow(2).sum() / fv[far].abs().pow(2).sum()
    assert 1.8 < float(ratio) < 2.2


def test_randomisation_is_seeded_batched_and_upcasts():
    v = _noise(16, 2, torch.float32)
    a = randomise_phases_beyond(v, 4, torch.Generator().manual_seed(0))
    b = randomise_phases_beyond(v, 4, torch.Generator().manual_seed(0))
    c = randomise_phases_beyond(v, 4, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.dtype == torch.float32
    h = randomise_phases_beyond(v.bfloat16(), 4, torch.Generator().manual_seed(0))
    assert h.dtype == torch.float32
    batch = randomise_phases_beyond(torch.stack([v, v]), 4, torch.Generator().manual_seed(0))
    assert batch.shape == (2, 16, 16, 16) and not torch.allclose(batch[0], batch[1])
    # a cut beyond the corner of the spectrum leaves the map as it was
    torch.testing.assert_close(randomise_phases_beyond(v, 100), v, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_randomisation_same_on_cuda_with_a_cpu_generator():
    v = _noise(16, 2, torch.float32)
    cpu = randomise_phases_beyond(v, 4, torch.Generator().manual_seed(0))
    gpu = randomise_phases_beyond(v.cuda(), 4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)


def test_fsc_corrected_formula_and_start():
    masked = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    random = torch.tensor([1.0, 0.9, 0.5, 0.4, 0.5, 0.6])
    out = fsc_corrected(masked, random, randomise_from=1)  # corrected from shell 1 + 2 = 3
    expected = torch.tensor([1.0, 0.9, 0.8, 0.3 / 0.6, 0.1 / 0.5, -0.1 / 0.4])  # not clipped
    torch.testing.assert_close(out, expected)
    assert randomise_from_shell(torch.tensor([1.0, 0.9, 0.81, 0.79, 0.9])) == 3
    assert randomise_from_shell(torch.tensor([1.0, 0.9, 0.81])) is None


def _band_limited_half_maps(size=48, band=8, noise=1.0):
    """A shared signal band-limited to ``|k| <= band`` plus independent white noise per half:
    the true FSC is 0 beyond ``band``."""
    r = radius_grid((size,) * 3, dtype=torch.float64)
    sig = _noise(size, 0) * spherical_mask(size, 12, 3).double()
    sig = ifft3_centered(fft3_centered(sig) * (r <= band)).real
    sig = sig / sig.std()
    return sig, sig + noise * _noise(size, 1), sig + noise * _noise(size, 2)


@pytest.mark.parametrize("mask_kind", ["thresholded", "sphere"])
def test_sharp_mask_inflation_is_removed(mask_kind):
    sig, h1, h2 = _band_limited_half_maps()
    mask = (sig.abs() > 0.8).double() if mask_kind == "thresholded" else spherical_mask(48, 12).double()
    res = half_map_resolution(h1, h2, 1.0, mask, seed=0)
    shell = res["randomise_from_shell"]
    assert shell == 9  # the unmasked FSC is ~1 to the band edge (8), ~0 beyond
    hi = slice(12, None)
    raw, corrected = np.array(res["fsc_masked_uncorrected"][hi]), np.array(res["fsc_masked"][hi])
    assert raw.mean() > 0.15, raw  # the sharp mask's own correlation
    assert abs(corrected.mean()) < 0.05 and np.abs(corrected).max() < 0.2, corrected
    assert res["res_0.143_masked"] > res["res_0.143_masked_uncorrected"]
    assert res["randomise_from_angstrom"] == pytest.approx(48 / 9)
    assert res["fsc_masked"][: shell + 2] == res["fsc_masked_uncorrected"][: shell + 2]


def test_without_mask_the_masked_keys_are_none():
    _, h1, h2 = _band_limited_half_maps(size=24, band=4)
    res = half_map_resolution(h1, h2, 1.0, None)
    assert res["fsc_masked"] is None and res["fsc_phase_randomised"] is None
    assert res["res_0.143_masked"] is None and res["randomise_from_shell"] is None
    assert res["res_0.143_unmasked"] > 0


def _relion_case():
    spec = importlib.util.spec_from_file_location("relion_pp", ROOT / "benchmarks" / "relion_postprocess_fsc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    h1, h2, m = (torch.from_numpy(a) for a in mod.make_half_maps())
    rows = [ln for ln in FIXTURE.read_text().splitlines() if not ln.startswith("#")]
    names = rows[0].split(",")
    table = np.array([[float(x) for x in ln.split(",")] for ln in rows[1:]])
    return mod, h1, h2, m, {n: table[:, i] for i, n in enumerate(names)}


def test_agrees_with_relion_postprocess():
    """RELION 3.1.3's curves: unmasked and masked FSC to the precision of its STAR file (1e-6; 1e-5 for negative values; same
    half-complex shell sums); randomisation from shell 11 (8.73 Å: its rlnRandomiseFrom) and
    correction from shell 13; the phase-randomised and corrected curves differ by the draw of
    the random phases, so RELION's (seed 0 of its own generator) must lie within 4 standard
    deviations (+0.01) of the spread of ours over 8 seeds (at most ~2.1 sd measured)."""
    mod, h1, h2, m, rel = _relion_case()
    runs = [half_map_resolution(h1, h2, mod.APIX, m, seed=s) for s in range(8)]
    ours = runs[0]
    np.testing.assert_allclose(ours["fsc_unmasked"], rel["rlnFourierShellCorrelationUnmaskedMaps"], atol=6e-6)
    np.testing.assert_allclose(ours["fsc_masked_uncorrected"], rel["rlnFourierShellCorrelationMaskedMaps"], atol=6e-6)
    assert ours["randomise_from_shell"] == 11
    relc = rel["rlnFourierShellCorrelationCorrected"]
    # RELION's corrected curve is its masked one up to randomise_from + 1, and differs after
    assert np.array_equal(relc[:13], rel["rlnFourierShellCorrelationMaskedMaps"][:13])
    assert np.all(relc[13:17] < rel["rlnFourierShellCorrelationMaskedMaps"][13:17] - 0.03)
    np.testing.assert_allclose(ours["fsc_masked"][:13], relc[:13], atol=6e-6)
    for key, col in (("fsc_masked", "rlnFourierShellCorrelationCorrected"),
                     ("fsc_phase_randomised", "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps")):
        curves = np.array([r[key] for r in runs])[:, 11:]
        mean, sd = curves.mean(0), curves.std(0, ddof=1)
        assert np.all(np.abs(rel[col][11:] - mean) <= 4 * sd + 0.01), (key, rel[col][11:] - mean, sd)
