"""RELION's CTF (``CTF::getCTF``): formula, zeros, astigmatism axis, sign, envelope, batching.

RELION: ``CTF = scale * -sin(K1 dF s^2 + K2 s^4 - phase_shift - K3) * exp(-B s^2 / 4)`` with
``dF = -(U+V)/2 - (U-V)/2 cos(2 (atan2(sy, sx) - angle))``, ``K1 = pi lambda``,
``K2 = pi/2 Cs lambda^3``, ``K3 = atan(Q / sqrt(1 - Q^2))`` and
``lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))`` (V in volts, lambda in Å).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hetero.physics.conventions import electron_wavelength_angstrom
from hetero.physics.ctf import (
    CTF_COLUMNS,
    CTFParams,
    compute_ctf,
    ctf_from_frequencies,
    ctf_table_compute,
)


def reference_ctf(sx, sy, du, dv, ang_deg, kv, cs_mm, q, ps_deg=0.0, bf=0.0, scale=1.0):
    """Independent numpy transcription of RELION's formula (float64)."""
    volts = kv * 1e3
    lam = 12.2643247 / np.sqrt(volts * (1 + 0.978466e-6 * volts))
    k1 = np.pi * lam
    k2 = np.pi / 2 * cs_mm * 1e7 * lam**3
    k3 = np.arctan(q / np.sqrt(1 - q**2))
    k5 = np.deg2rad(ps_deg)
    u2 = sx**2 + sy**2
    alpha = np.arctan2(sy, sx)
    df = -(du + dv) / 2 - (du - dv) / 2 * np.cos(2 * (alpha - np.deg2rad(ang_deg)))
    return scale * -np.sin(k1 * df * u2 + k2 * u2**2 - k5 - k3) * np.exp(-bf * u2 / 4)


def _polar(s: np.ndarray, azimuth_deg: float) -> tuple[torch.Tensor, torch.Tensor]:
    a = math.radians(azimuth_deg)
    s = torch.as_tensor(s, dtype=torch.float64)
    return s * math.cos(a), s * math.sin(a)


@pytest.mark.parametrize(("kv", "lam"), [(300.0, 0.019687), (200.0, 0.025079), (100.0, 0.037014)])
def test_electron_wavelength(kv, lam):
    assert electron_wavelength_angstrom(kv) == pytest.approx(lam, abs=1e-6)


def test_formula_matches_independent_transcription():
    rng = np.random.default_rng(0)
    s = rng.uniform(-0.3, 0.3, size=(2, 500))
    for _ in range(10):
        p = dict(
            du=rng.uniform(5e3, 3e4), dv=rng.uniform(5e3, 3e4), ang_deg=rng.uniform(-180, 180),
            kv=rng.choice([100.0, 200.0, 300.0]), cs_mm=rng.uniform(0.01, 3.0), q=rng.uniform(0, 0.3),
            ps_deg=rng.uniform(0, 120), bf=rng.uniform(-50, 200), scale=rng.uniform(0.5, 1.5),
        )
        expected = reference_ctf(s[0], s[1], **p)
        got = ctf_from_frequencies(torch.tensor(s[0]), torch.tensor(s[1]), *p.values())
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-10)


def _isotropic_zeros(df: float, kv: float, cs_mm: float, s_max: float) -> np.ndarray:
    """Spatial frequencies (1/Å) of the CTF zeros for Q = 0, no phase shift: chi(s) = -n pi."""
    lam = electron_wavelength_angstrom(kv)
    k1, k2 = math.pi * lam, math.pi / 2 * cs_mm * 1e7 * lam**3
    zeros = []
    for n in range(1, 1000):
        disc = (k1 * df) ** 2 - 4 * k2 * n * math.pi
        if disc < 0:
            break
        u = (k1 * df - math.sqrt(disc)) / (2 * k2)  # K2 u^2 - K1 df u + n pi = 0, u = s^2
        if math.sqrt(u) > s_max:
            break
        zeros.append(math.sqrt(u))
    return np.array(zeros)


@pytest.mark.parametrize("azimuth", [0.0, 37.0, 123.4])
def test_zeros_where_the_formula_puts_them(azimuth):
    df, kv, cs = 15000.0, 300.0, 2.7
    zeros = _isotropic_zeros(df, kv, cs, s_max=0.25)
    assert len(zeros) > 8
    sx, sy = _polar(zeros, azimuth)
    ctf = ctf_from_frequencies(sx, sy, df, df, 12.0, kv, cs, 0.0)
    assert ctf.abs().max() < 1e-9
    # Between consecutive zeros the CTF alternates sign, starting positive (first lobe).
    mids = np.concatenate([[zeros[0] / 2], (zeros[1:] + zeros[:-1]) / 2])
    sx, sy = _polar(mids, azimuth)
    lobes = ctf_from_frequencies(sx, sy, df, df, 12.0, kv, cs, 0.0)
    expected_sign = torch.tensor([(-1.0) ** n for n in range(len(mids))], dtype=torch.float64)
    assert torch.equal(torch.sign(lobes), expected_sign)
    # ... and away from the zeros it is far from zero (the zeros are not an artefact).
    assert lobes.abs().min() > 0.3


def test_astigmatism_axis_defocus_u_lies_along_the_angle():
    du, dv, angle = 20000.0, 10000.0, 30.0
    s = np.linspace(0.005, 0.2, 200)
    for az, d in [(angle, du), (angle + 180, du), (angle + 90, dv), (angle - 90, dv)]:
        sx, sy = _polar(s, az)
        astig = ctf_from_frequencies(sx, sy, du, dv, angle, 300.0, 2.7, 0.07)
        iso = ctf_from_frequencies(sx, sy, d, d, 0.0, 300.0, 2.7, 0.07)
        torch.testing.assert_close(astig, iso, atol=1e-10, rtol=0)
    # The mean defocus along the diagonals.
    sx, sy = _polar(s, angle + 45)
    torch.testing.assert_close(
        ctf_from_frequencies(sx, sy, du, dv, angle, 300.0, 2.7, 0.07),
        ctf_from_frequencies(sx, sy, 15000.0, 15000.0, 0.0, 300.0, 2.7, 0.07),
        atol=1e-10, rtol=0,
    )


@pytest.mark.parametrize("theta", [17.0, 90.0, -65.0])
def test_defocus_angle_rotates_the_pattern(theta):
    g = torch.Generator().manual_seed(1)
    sx, sy = (torch.rand(2, 400, generator=g, dtype=torch.float64) - 0.5) * 0.4
    t = math.radians(theta)
    rx, ry = sx * math.cos(t) - sy * math.sin(t), sx * math.sin(t) + sy * math.cos(t)
    base = ctf_from_frequencies(sx, sy, 25000.0, 12000.0, 5.0, 300.0, 2.7, 0.1)
    rotated = ctf_from_frequencies(rx, ry, 25000.0, 12000.0, 5.0 + theta, 300.0, 2.7, 0.1)
    torch.testing.assert_close(rotated, base, atol=1e-10, rtol=0)


def test_grid_axes_x_is_the_last_index():
    """compute_ctf's grid: element [D//2 + ky, D//2 + kx] is frequency (kx, ky) / (D apix)."""
    d, apix, du, dv = 64, 1.3, 24000.0, 9000.0
    ctf = compute_ctf(d, apix, du, dv, 0.0, 300.0, 2.7, 0.1, dtype=torch.float64)
    assert ctf.shape == (d, d)
    k = torch.arange(1, d // 2, dtype=torch.float64)
    along_x = ctf[d // 2, d // 2 + 1 :]
    along_y = ctf[d // 2 + 1 :, d // 2]
    s = k / (d * apix)
    zeros = torch.zeros_like(s)
    torch.testing.assert_close(along_x, ctf_from_frequencies(s, zeros, du, du, 0.0, 300.0, 2.7, 0.1))
    torch.testing.assert_close(along_y, ctf_from_frequencies(zeros, s, dv, dv, 0.0, 300.0, 2.7, 0.1))
    assert (along_x - along_y).abs().max() > 0.5  # the two axes really differ


@pytest.mark.parametrize("q", [0.0, 0.07, 0.1, 0.3])
@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_sign_positive_at_dc_for_white_density(q, scale):
    d = 32
    ctf = compute_ctf(d, 1.5, 18000.0, 15000.0, 40.0, 300.0, 2.7, q, scale=scale, dtype=torch.float64)
    dc = ctf[d // 2, d // 2].item()
    assert dc == pytest.approx(scale * math.sin(math.atan(q / math.sqrt(1 - q**2))), abs=1e-12)
    assert dc == pytest.approx(scale * q, abs=1e-12)
    assert dc >= 0
    # The first lobe (underfocus) is positive: low-frequency contrast keeps white density white.
    s = torch.linspace(1e-4, 0.01, 50, dtype=torch.float64)
    assert torch.all(ctf_from_frequencies(s, 0 * s, 18000.0, 15000.0, 40.0, 300.0, 2.7, q, scale=scale) > 0)


def test_phase_shift_enters_with_the_amplitude_contrast():
    # A 90-degree phase plate turns the DC value into scale * cos(K3) = scale * sqrt(1 - Q^2).
    z = torch.zeros(1, dtype=torch.float64)
    v = ctf_from_frequencies(z, z, 1e4, 1e4, 0.0, 300.0, 2.7, 0.1, phase_shift_deg=90.0)
    assert v.item() == pytest.approx(math.sqrt(1 - 0.01), abs=1e-12)


def test_b_factor_envelope():
    s = torch.linspace(0.01, 0.3, 300, dtype=torch.float64)
    sx, sy = _polar(s.numpy(), 25.0)
    base = ctf_from_frequencies(sx, sy, 15000.0, 14000.0, 10.0, 300.0, 2.7, 0.1)
    for bf in (-20.0, 50.0, 150.0):
        env = ctf_from_frequencies(sx, sy, 15000.0, 14000.0, 10.0, 300.0, 2.7, 0.1, b_factor=bf)
        torch.testing.assert_close(env, base * torch.exp(-bf * s**2 / 4), atol=1e-12, rtol=0)
    # Positive B damps: at s = 0.3 with B = 150 the envelope is exp(-3.375).
    full = ctf_from_frequencies(sx, sy, 15000.0, 14000.0, 10.0, 300.0, 2.7, 0.1, b_factor=150.0)
    assert full.abs().max() <= 1 + 1e-12
    assert (full / base)[-1].item() == pytest.approx(math.exp(-150 * 0.09 / 4))


def _table(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)  # noqa: E731
    return torch.stack(
        [u(8e3, 3e4), u(8e3, 3e4), u(-180, 180), u(200, 300), u(0.5, 2.7), u(0.05, 0.15),
         u(0, 90), u(0, 100), u(0.8, 1.2)],
        -1,
    )


def test_batched_parameters_equal_individual_calls():
    table = _table(5)
    d, apix = 24, 1.7
    batched = compute_ctf(d, apix, *table.unbind(-1), dtype=torch.float64)
    assert batched.shape == (5, d, d)
    for i in range(5):
        single = compute_ctf(d, apix, *table[i].tolist(), dtype=torch.float64)
        assert single.shape == (d, d)
        torch.testing.assert_close(batched[i], single, atol=1e-12, rtol=0)
    # Only some parameters batched: the scalars broadcast.
    mixed = compute_ctf(d, apix, table[:, 0], table[:, 0], 0.0, 300.0, 2.7, 0.1, dtype=torch.float64)
    for i in range(5):
        df = table[i, 0].item()
        torch.testing.assert_close(mixed[i], compute_ctf(d, apix, df, df, 0.0, 300.0, 2.7, 0.1, dtype=torch.float64))


def test_batched_pixel_size_equals_individual_calls():
    """One pixel size per particle (several optics groups) together with batched defoci must
    give (B, D, D), not (B, B, D, D)."""
    table = _table(4, seed=1)
    apix = torch.tensor([1.0, 1.35, 2.1, 0.9], dtype=torch.float64)
    d = 20
    batched = compute_ctf(d, apix, *table.unbind(-1), dtype=torch.float64)
    assert batched.shape == (4, d, d)
    for i in range(4):
        single = compute_ctf(d, apix[i].item(), *table[i].tolist(), dtype=torch.float64)
        torch.testing.assert_close(batched[i], single, atol=1e-12, rtol=0)
    only_apix = compute_ctf(d, apix, 15000.0, 15000.0, 0.0, 300.0, 2.7, 0.1, dtype=torch.float64)
    assert only_apix.shape == (4, d, d)
    torch.testing.assert_close(only_apix[2], compute_ctf(d, 2.1, 15000.0, 15000.0, 0.0, 300.0, 2.7, 0.1, dtype=torch.float64))


def test_ctf_params_table_round_trip():
    assert CTF_COLUMNS == (
        "defocus_u_angstrom", "defocus_v_angstrom", "defocus_angle_deg", "voltage_kv",
        "spherical_aberration_mm", "amplitude_contrast", "phase_shift_deg", "b_factor", "scale",
    )
    table = _table(3, seed=2).float()
    params = CTFParams.from_tensor(table)
    assert torch.equal(params.to_tensor(), table)
    direct = compute_ctf(16, 1.2, *table.unbind(-1))
    torch.testing.assert_close(params.compute(16, 1.2), direct)
    torch.testing.assert_close(ctf_table_compute(table, 16, 1.2), direct)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_upcast(half):
    g = torch.Generator().manual_seed(3)
    sx, sy = ((torch.rand(2, 64, 64, generator=g) - 0.5) * 0.6).to(half)
    df = torch.tensor([12000.0, 20000.0], dtype=half)
    out = ctf_from_frequencies(sx, sy, df, df, torch.tensor([10.0, 20.0], dtype=half), 300.0, 2.7, 0.1)
    assert out.dtype == torch.float32 and out.shape == (2, 64, 64)
    assert torch.isfinite(out).all()
    ref = ctf_from_frequencies(sx.float(), sy.float(), df.float(), df.float(), torch.tensor([10.0, 20.0], dtype=half).float(), 300.0, 2.7, 0.1)
    torch.testing.assert_close(out, ref)

    grid = compute_ctf(32, 1.5, df, df.float(), 0.0, 300.0, 2.7, 0.1)
    assert grid.dtype == torch.float32 and torch.isfinite(grid).all()


def test_compute_ctf_under_autocast_stays_float32():
    df = torch.tensor([12000.0, 20000.0])
    ref = compute_ctf(32, 1.5, df, df, 0.0, 300.0, 2.7, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compute_ctf(32, 1.5, df, df, 0.0, 300.0, 2.7, 0.1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
