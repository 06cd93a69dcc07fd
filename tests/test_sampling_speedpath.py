"""The fast sampling path (noise_fit/_sampling.py): same laws as the model, deterministic, any shape.

Statistical tolerances: n >= 2e5 samples, bounds of 4-5 standard errors (or 2 % on a std, whose
relative SE is 1/sqrt(2n) < 0.16 %), so a correct implementation fails with negligible probability.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from scipy import integrate, stats

from noise_fit import _sampling
from noise_fit.model import Curve, NoiseModel
from noise_fit.presets import gaussian_relative, pcm_hermes2023, resolve

N = 200_000
SPECS = ["pcm", "hermes", "hermes:1", "rram", "gaussian"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 7, 100_001])
def test_box_muller_normals_are_standard_normal(dtype: type, n: int) -> None:
    gen = np.random.default_rng(10)
    reps = max(10, 60_000 // n) if n < 100 else 10  # small n: odd/even halves and the tiny-chunk path
    z = np.empty((reps, n), dtype)
    bm = np.empty(n + 2, dtype)
    for row in z:
        _sampling.normals(gen, row, bm)
    assert z.dtype == dtype and np.isfinite(z).all()
    z = z.ravel().astype(np.float64)
    se = 1 / math.sqrt(z.size)
    assert abs(z.mean()) < 5 * se
    assert z.std() == pytest.approx(1.0, abs=5 * se)
    assert stats.kstest(z, "norm").pvalue > 1e-4
    assert abs(stats.skew(z)) < 5 * math.sqrt(6 / z.size)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / z.size)
    for k in (2.0, 3.0, 4.0):  # tails
        p = 2 * stats.norm.sf(k)
        assert abs((np.abs(z) > k).mean() - p) < 5 * math.sqrt(p / z.size) + 1e-6


def test_box_muller_pair_halves_uncorrelated() -> None:
    gen = np.random.default_rng(11)
    z = np.empty(1_000_000, np.float32)
    _sampling.normals(gen, z, np.empty(z.size + 2, np.float32))
    a, b = z[:500_000].astype(np.float64), z[500_000:].astype(np.float64)
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(a.size)
    assert abs(np.corrcoef(a**2, b**2)[0, 1]) < 5 / math.sqrt(a.size)  # independence, not just r = 0


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_curves_match_reference(spec: str, dtype: type) -> None:
    m = resolve(spec)
    x = np.concatenate([[0.0, 1e-9, 1e-6], np.geomspace(1e-4, 1.0, 500), np.linspace(0, 1.2, 500)]).astype(dtype)
    b = _sampling._Buffers(x.size, np.dtype(dtype))
    for c in (m.prog_sigma, m.nu_mean, m.nu_std, m.read_sigma, Curve("power", (0.01, 0.5)),
              Curve("poly", (0.3,)), Curve("loglin", (0.1, -0.01), lo=0.0)):
        out = np.empty_like(x)
        _sampling.curve_into(c, x, out, b.s, _sampling._logx(b, x.size, x))
        np.testing.assert_allclose(out, c(x), rtol=2e-5 if dtype == np.float32 else 1e-12, atol=1e-12)


def test_zero_curve_detection() -> None:
    assert _sampling.curve_is_zero(Curve("const", (0.0,)), False)
    assert _sampling.curve_is_zero(Curve("const", (-1.0,)), True)
    assert not _sampling.curve_is_zero(Curve("const", (-1.0,)), False)
    assert not _sampling.curve_is_zero(Curve("const", (0.0,), lo=0.1), True)
    assert _sampling.curve_is_zero(Curve("poly", (0.0, 0.0)), False)
    assert _sampling.curve_is_zero(Curve("power", (0.0, -0.5)), False)
    assert not _sampling.curve_is_zero(Curve("loglin", (0.0, 0.1)), False)
    assert _sampling.curve_is_zero(Curve("loglin", (0.1, 0.3), hi=-1.0), True)


# ---- the laws of the model -----------------------------------------------------------------


@pytest.mark.parametrize("spec", ["pcm", "hermes", "rram"])
@pytest.mark.parametrize("how", ["programmed", "sample_t0"])
def test_programming_noise_per_bin(spec: str, how: str) -> None:
    m = resolve(spec)
    rng = np.random.default_rng(20)
    g_t = rng.uniform(0.0, m.g_max, 4 * N).astype(np.float32)
    if how == "programmed":
        d = m.programmed(g_t, rng) - g_t
    else:
        d = m.scaled(read=0.0).sample(g_t, 0.0, rng) - g_t  # t = 0: no drift
    r = d.astype(np.float64) / m.sigma_prog(g_t.astype(np.float64))
    edges = np.linspace(0.0, m.g_max, 11)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (g_t >= lo) & (g_t < hi) & (g_t > 6 * m.sigma_prog(g_t))  # away from the floor at 0
        if sel.sum() < 10_000:
            continue
        rb = r[sel]
        assert abs(rb.mean()) < 5 / math.sqrt(rb.size), (lo, hi)
        assert rb.std() == pytest.approx(1.0, rel=0.02), (lo, hi)


def _expected_drift_factor(mu: float, sd: float, big_l: float) -> float:
    def f(z: float) -> float:
        return math.exp(-abs(mu + sd * z) * big_l) * stats.norm.pdf(z)
    return integrate.quad(f, -12, 12, points=[-mu / sd], limit=200)[0]


@pytest.mark.parametrize("spec", ["pcm", "hermes"])
@pytest.mark.parametrize("t", [60.0, 86400.0])
def test_drift_factor_mean_matches_formula(spec: str, t: float) -> None:
    m = resolve(spec).scaled(prog=0.0, read=0.0)
    g0 = 0.5 * m.g_max
    g_t = np.full(N, g0, np.float32)
    out = m.sample(g_t, t, np.random.default_rng(21)).astype(np.float64) / g0
    mu, sd = float(m.nu_mean(np.array(0.5))), float(m.nu_std(np.array(0.5)))
    big_l = math.log((t + m.t0) / m.t0)
    expect = _expected_drift_factor(mu, sd, big_l)
    assert out.mean() == pytest.approx(expect, abs=5 * out.std() / math.sqrt(N) + 1e-6)
    nu = -np.log(out) / big_l  # the exponents themselves: folded normal |N(mu, sd)|
    assert nu.mean() == pytest.approx(stats.foldnorm(abs(mu) / sd, scale=sd).mean(), rel=0.01)
    assert nu.std() == pytest.approx(stats.foldnorm(abs(mu) / sd, scale=sd).std(), rel=0.02)
    # at_time with given exponents is the deterministic law
    g = m.at_time(g_t, t, np.random.default_rng(0), nu=np.float32(0.05))
    np.testing.assert_allclose(g, g0 * ((t + m.t0) / m.t0) ** -0.05, rtol=1e-5)


@pytest.mark.parametrize("relative", [True, False])
def test_read_noise_std(relative: bool) -> None:
    m = NoiseModel("read", 0.0, 10.0, prog_sigma=Curve("const", (0.0,)),
                   read_sigma=Curve("const", (0.05,)), read_relative=relative, read_time_law="log1f",
                   t_read=1e-6, read_scale=1.5)
    g0, t = 4.0, 100.0
    g = np.full(N, g0)
    d = m.sample(g, t, np.random.default_rng(22)) - g0
    law = m.read_time_factor(t)
    expect = 1.5 * 0.05 * law * (g0 if relative else 1.0)
    assert d.std() == pytest.approx(expect, rel=0.02)
    assert abs(d.mean()) < 5 * expect / math.sqrt(N)
    assert m.at_time(g, t, np.random.default_rng(0)).std() == pytest.approx(expect, rel=0.02)


@pytest.mark.parametrize("p_low,p_high", [(0.004, 0.002), (0.02, 0.01), (0.3, 0.0), (0.0, 1.0)])
def test_stuck_rates(p_low: float, p_high: float) -> None:
    m = replace(resolve("pcm"), p_stuck_low=p_low, p_stuck_high=p_high, g_stuck_low=0.123, read_scale=0.0)
    n = 4 * N
    g_t = np.full(n, 12.0, np.float32)
    out = m.sample(g_t, 3600.0, np.random.default_rng(23), chunk=50_000)
    codes = m.stuck_codes((n,), np.random.default_rng(24))
    prog = m.programmed(g_t, np.random.default_rng(25))
    for p, got_s, got_c, got_p in ((p_low, out == np.float32(0.123), codes == 1, prog == np.float32(0.123)),
                                   (p_high, out == np.float32(m.g_max), codes == 2, prog == np.float32(m.g_max))):
        tol = 5 * math.sqrt(p * (1 - p) / n) + 1e-9
        for got in (got_s, got_c, got_p):
            assert abs(got.mean() - p) < tol
    assert codes.dtype == np.int8 and set(np.unique(codes)) <= {0, 1, 2}


def test_stuck_cells_do_not_drift_and_get_read_noise() -> None:
    m = replace(pcm_hermes2023(), p_stuck_high=0.5)
    g_t = np.full(N, 5.0)
    stuck = m.stuck_codes(g_t.shape, np.random.default_rng(1))
    gp = m.programmed(g_t, np.random.default_rng(2), stuck=stuck)
    assert (gp[stuck == 2] == m.g_max).all()
    quiet = m.scaled(read=0.0)
    g = quiet.at_time(gp, 1e5, np.random.default_rng(3), stuck=stuck)
    assert (g[stuck == 2] == m.g_max).all() and (g[stuck == 0] < gp[stuck == 0]).all()
    noisy = m.at_time(gp, 1e5, np.random.default_rng(3), stuck=stuck)
    assert noisy[stuck == 2].std() > 0


# ---- determinism and threads ------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_deterministic_and_independent_of_workers(spec: str) -> None:
    m = replace(resolve(spec), p_stuck_low=0.01)
    g = np.random.default_rng(0).uniform(0, m.g_max, 100_003).astype(np.float32)
    runs = [m.sample(g, 3600.0, np.random.default_rng(7), workers=w, chunk=4096) for w in (1, 2, 3, 8)]
    for r in runs[1:]:
        np.testing.assert_array_equal(r, runs[0])
    for fn in (lambda w: m.programmed(g, np.random.default_rng(8), workers=w, chunk=4096),
               lambda w: m.at_time(g, 60.0, np.random.default_rng(8), workers=w, chunk=4096)):
        np.testing.assert_array_equal(fn(1), fn(4))
    rng = np.random.default_rng(7)
    a, b = m.sample(g, 3600.0, rng), m.sample(g, 3600.0, rng)
    assert not np.array_equal(a, b)  # the generator advances between calls
    assert not np.array_equal(runs[0], m.sample(g, 3600.0, np.random.default_rng(7), chunk=5000))


def test_sample_into_in_place_and_out_checks() -> None:
    m = resolve("pcm")
    g = np.random.default_rng(0).uniform(0, m.g_max, (300, 501)).astype(np.float32)
    ref = m.sample(g, 60.0, np.random.default_rng(9))
    out = np.empty_like(g)
    assert m.sample_into(g, 60.0, np.random.default_rng(9), out=out) is out
    np.testing.assert_array_equal(out, ref)
    inplace = g.copy()
    m.sample_into(inplace, 60.0, np.random.default_rng(9), out=inplace)
    np.testing.assert_array_equal(inplace, ref)
    with pytest.raises(ValueError, match="out must be"):
        m.sample_into(g, 60.0, np.random.default_rng(9), out=np.empty(g.shape, np.float64))
    with pytest.raises(ValueError, match="out must be"):
        m.sample_into(g, 60.0, np.random.default_rng(9), out=np.empty((501, 300), np.float32).T)
    with pytest.raises(ValueError, match="t must be"):
        m.sample(g, -1.0, np.random.default_rng(9))
    with pytest.raises(ValueError, match="workers"):
        m.sample(g, 1.0, np.random.default_rng(9), workers=0)


# ---- mappings, dtypes, shapes -----------------------------------------------------------------


def test_direct_mapping_is_signed_without_floor() -> None:
    m = gaussian_relative(0.1)
    w = np.random.default_rng(0).uniform(-1, 1, N).astype(np.float32)
    out = m.sample(w, 0.0, np.random.default_rng(30))
    assert (out < 0).mean() > 0.4
    d = (out - w).astype(np.float64)
    assert d.std() == pytest.approx(0.1, rel=0.02) and abs(d.mean()) < 5 * 0.1 / math.sqrt(N)
    z = m.programmed(np.zeros(N), np.random.default_rng(31))
    assert (z < 0).mean() == pytest.approx(0.5, abs=0.01)
    pcm = resolve("pcm")
    assert (pcm.sample(np.zeros(N, np.float32), 60.0, np.random.default_rng(32)) >= 0).all()


def test_dtypes() -> None:
    m = resolve("pcm")
    g64 = np.linspace(0, 25, 1000)
    assert m.sample(g64, 60.0, np.random.default_rng(0)).dtype == np.float64
    assert m.programmed(g64, np.random.default_rng(0)).dtype == np.float64
    assert m.at_time(g64, 1.0, np.random.default_rng(0)).dtype == np.float64
    g32 = g64.astype(np.float32)
    for f in (lambda g: m.sample(g, 60.0, np.random.default_rng(0)),
              lambda g: m.programmed(g, np.random.default_rng(0)),
              lambda g: m.at_time(g, 1.0, np.random.default_rng(0))):
        assert f(g32).dtype == np.float32
        assert f(np.arange(10)).dtype == np.float64  # integers compute in float64
        assert f([1.0, 2.0]).shape == (2,)
    r64 = m.sample(np.full(N, 12.5), 60.0, np.random.default_rng(1))
    r32 = m.sample(np.full(N, 12.5, np.float32), 60.0, np.random.default_rng(1))
    assert r64.std() == pytest.approx(float(r32.std()), rel=0.02)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 5), (), (1,), (2, 3, 4)])
def test_empty_and_scalar_shapes(shape: tuple[int, ...]) -> None:
    m = replace(resolve("pcm"), p_stuck_low=0.01)
    g = np.full(shape, 10.0, np.float32)
    for out in (m.sample(g, 60.0, np.random.default_rng(0)), m.programmed(g, np.random.default_rng(0)),
                m.at_time(g, 60.0, np.random.default_rng(0)),
                m.at_time(g, 60.0, np.random.default_rng(0), nu=np.zeros(shape), stuck=np.zeros(shape, np.int8))):
        assert isinstance(out, np.ndarray) and out.shape == shape and out.dtype == np.float32
        assert np.isfinite(out).all()
    assert m.stuck_codes(shape, np.random.default_rng(0)).shape == shape
    assert m.sample(10.0, 60.0, np.random.default_rng(0)).shape == ()


def test_nothing_to_do_returns_copy() -> None:
    m = NoiseModel("none", 0.0, 1.0, prog_sigma=Curve("const", (0.0,)), mapping="direct")
    g = np.linspace(-1, 1, 11)
    out = m.sample(g, 100.0, np.random.default_rng(0))
    np.testing.assert_array_equal(out, g)
    assert out is not g
