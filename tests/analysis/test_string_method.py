"""The zero-temperature string method: analytic minimum-energy paths, the convex-hull guard,
and the AlphaCryo4D reference example (../shared/data/alphacryo4d_fast)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hetero.analysis.landscape import Landscape, pseudo_energy
from hetero.analysis.string_method import path_states, reparametrize, string_method

FAST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "alphacryo4d_fast"


def _grid_landscape(fn, lim=2.0, n=41, method="cubic"):
    x = np.linspace(-lim, lim, n)
    gx, gy = np.meshgrid(x, x, indexing="ij")
    pts = np.stack([gx.ravel(), gy.ravel()], 1)
    return Landscape.from_points(pts, fn(pts), method)


def _ring(p):
    """Minima at (0, +-1), saddles at (+-1, 0); the minimum-energy paths are the two halves
    of the unit circle (the gradient on r = 1 is tangential)."""
    r = np.hypot(p[:, 0], p[:, 1])
    theta = np.arctan2(p[:, 1], p[:, 0])
    return 4.0 * (r - 1.0) ** 2 + np.cos(2 * theta)


def test_reparametrize_gives_equal_arc_length():
    t = np.linspace(0, 1, 50) ** 2
    path = np.stack([np.cos(3 * t), np.sin(3 * t)], 1)
    out = reparametrize(path, 80)
    seg = np.linalg.norm(np.diff(out, axis=0), axis=1)
    assert seg.std() / seg.mean() < 2e-3
    np.testing.assert_array_equal(out[[0, -1]], path[[0, -1]])


def test_string_finds_the_curved_minimum_energy_path():
    land = _grid_landscape(_ring)
    res = string_method(land, (0.3, 1.1), (0.3, -1.1), n_images=60, step=0.05, tol=1e-8, max_steps=5000)
    assert res.converged
    r = np.hypot(res.path[:, 0], res.path[:, 1])
    # on the circle up to the interpolation error of the 0.1-spaced grid (the straight
    # initial string had 0.3 <= r <= 1.14)
    assert np.abs(r - 1).max() < 0.02
    assert res.path[:, 0].min() > -0.02  # through the right-hand saddle
    # endpoints slid into the minima; the highest image is the saddle (1, 0) with G = 1
    np.testing.assert_allclose(res.path[[0, -1]], [[0, 1], [0, -1]], atol=0.02)
    top = res.path[np.argmax(res.energies)]
    np.testing.assert_allclose(top, [1, 0], atol=0.03)
    assert abs(res.energies.max() - 1.0) < 0.01


def test_straight_double_well_path_and_fixed_endpoints():
    fn = lambda p: (p[:, 0] ** 2 - 1) ** 2 + 2 * p[:, 1] ** 2  # noqa: E731
    for method in ("cubic", "linear"):
        land = _grid_landscape(fn, method=method)
        res = string_method(land, (-1.2, 0.5), (1.2, 0.4), n_images=30, step=0.1, tol=1e-7, max_steps=500)
        # a piecewise-constant (linear) gradient keeps the images hopping between pieces
        assert res.converged == (method == "cubic")
        assert np.abs(res.path[:, 1]).max() < 0.05
        np.testing.assert_allclose(np.abs(res.path[[0, -1], 0]), 1.0, atol=0.05)
    fixed = string_method(land, (-1.2, 0.5), (1.2, 0.4), n_images=50, step=0.02, max_steps=50, fix_endpoints=True)
    np.testing.assert_array_equal(fixed.path[[0, -1]], [[-1.2, 0.5], [1.2, 0.4]])


def test_string_hopping_in_place_on_a_linear_landscape_stops_early():
    """A linear interpolant's piecewise-constant gradient keeps the images hopping between
    pieces forever (tol never reached): the run stops once a window of steps brings no net
    motion, with the string the full run ends with."""
    fn = lambda p: (p[:, 0] ** 2 - 1) ** 2 + 2 * p[:, 1] ** 2  # noqa: E731
    land = _grid_landscape(fn, method="linear")
    args = dict(n_images=30, step=0.1, tol=1e-7, max_steps=20000)
    full = string_method(land, (-1.2, 0.5), (1.2, 0.4), stationary_window=None, **args)
    early = string_method(land, (-1.2, 0.5), (1.2, 0.4), **args)
    assert not full.converged and full.n_steps == 20000 and not full.stationary
    assert early.stationary and not early.converged and early.n_steps <= 5000
    assert early.window_drift <= 10 * early.final_change
    # the same valley as the full run, to within the hops (~one 0.1 grid spacing)
    assert np.abs(early.path - full.path).max() < 0.1
    assert np.abs(early.path[:, 1]).max() < 0.05
    np.testing.assert_allclose(np.abs(early.path[[0, -1], 0]), 1.0, atol=0.05)
    # a converging string (cubic) is not stopped by the window
    cubic = string_method(_grid_landscape(fn), (-1.2, 0.5), (1.2, 0.4), **args)
    assert cubic.converged and not cubic.stationary


def test_analytic_and_central_gradients_agree():
    land = _grid_landscape(_ring)
    a = string_method(land, (0.3, 1.1), (0.3, -1.1), n_images=60, step=0.05, max_steps=300)
    c = string_method(land, (0.3, 1.1), (0.3, -1.1), n_images=60, step=0.05, max_steps=300, gradient="central")
    assert np.abs(a.path - c.path).max() < 1e-6


def test_string_is_kept_inside_the_convex_hull():
    # a tilted plane pushes every image towards the lower-left edge of the hull
    pts = np.random.default_rng(0).uniform(0, 1, (200, 2))
    land = Landscape.from_points(pts, pts[:, 0] + pts[:, 1], "linear")
    res = string_method(land, (0.2, 0.8), (0.8, 0.2), n_images=40, step=0.05, max_steps=40)
    assert res.hull_corrections > 0
    assert np.all(np.isfinite(res.path)) and land.contains(res.path).all()


def test_path_states_are_the_reference_indices():
    path = np.arange(500)[:, None] * np.ones((1, 2))
    np.testing.assert_array_equal(path_states(path, 7)[:, 0], np.linspace(0, 499, 7).astype(int))


# --------------------------------------------------------------------------- reference example
@pytest.fixture(scope="module")
def fast_landscape():
    if not FAST.is_dir():
        pytest.skip(f"AlphaCryo4D fixtures not found at {FAST}")
    pts = np.load(FAST / "output_big.npy")
    counts = np.loadtxt(FAST / "num_big.txt")
    return pts, counts, Landscape.from_points(pts, pseudo_energy(counts), "cubic")


def test_reference_string_first_steps_match_a_plain_scipy_implementation(fast_landscape):
    """The exact intermediate: 40 steps of the reference's loop written plainly on scipy's
    Clough-Tocher interpolant (central differences, d = 1e-5, h = 0.1, 500 images)."""
    from scipy.interpolate import CloughTocher2DInterpolator

    pts, counts, land = fast_landscape
    interp = CloughTocher2DInterpolator(pts, pseudo_energy(counts))
    d, h, steps = 1e-5, 0.1, 40
    p = reparametrize(np.linspace((-50.0, 100.0), (-80.0, -30.0), 500))
    for _ in range(steps):
        x, y = p[:, 0], p[:, 1]
        gx = (interp(x + d, y) - interp(x - d, y)) / (2 * d)
        gy = (interp(x, y + d) - interp(x, y - d)) / (2 * d)
        p = reparametrize(np.stack([x - h * gx, y - h * gy], 1))
    res = string_method(land, (-50, 100), (-80, -30), max_steps=steps, gradient="central")
    assert res.n_steps == steps
    assert np.abs(res.path - p).max() < 1e-8


@pytest.mark.slow
def test_reference_string_reproduces_centers_k(fast_landscape):
    """Tutorial settings: cubic, start (-50, 100), end (-80, -30), h 0.1, tol 1e-7, K = 7.
    The reference converged after 50,565 iterations (loop index) and wrote centers_k.npy.
    Agreement is ~1e-7: the converged string still drifts ~1e-6 per step, so the
    reference's own finite-difference rounding (~1e-10 per gradient) moves it by that much."""
    _, _, land = fast_landscape
    expected = np.load(FAST / "centers_k.npy")
    for gradient in ("central", "analytic"):
        res = string_method(land, (-50, 100), (-80, -30), n_images=500, step=0.1, tol=1e-7, gradient=gradient)
        assert res.converged and res.hull_corrections == 0
        assert res.n_steps == 50_566  # = loop index 50,565 + 1
        np.testing.assert_allclose(path_states(res.path, 7), expected, atol=2e-7)
