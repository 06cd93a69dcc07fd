"""NoiseModel, Curve and preset unit tests: serialisation, edge cases, sampling statistics."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from noise_fit.model import Curve, NoiseModel, NoiseModelError
from noise_fit.presets import PRESETS, gaussian_relative, pcm_hermes2023, resolve, rram_wan2022

ALL = ["pcm", "hermes", "hermes:1", "rram", "rram:86400", "rram:172800", "gaussian"]


@pytest.mark.parametrize("spec", ALL)
def test_json_round_trip(spec: str, tmp_path) -> None:
    m = replace(resolve(spec), p_stuck_low=0.01, diagnostics={"a": [1, 2]})
    p = tmp_path / "m.json"
    m.to_json(p)
    back = NoiseModel.from_json(p)
    assert back == m
    assert back.to_dict() == m.to_dict()


def test_presets_registered_with_citations() -> None:
    for name in ("hermes", "pcm-hermes2023", "rram", "rram-wan2022"):
        m = PRESETS[name]()
        assert m.provenance["citation"]
    assert "Le Gallo" in pcm_hermes2023().provenance["citation"]
    assert "Wan" in rram_wan2022().provenance["citation"]


@pytest.mark.parametrize("kind,coeffs", [("loglin", (0.1, -0.01)), ("power", (0.01, -0.65)),
                                         ("split", (0.1, 0.0, -0.01, 0.0, 0.05, 0.01, 0.0))])
def test_curves_defined_at_zero(kind: str, coeffs: tuple[float, ...]) -> None:
    c = Curve(kind, coeffs)
    y = c(np.array([0.0, 1e-12, 0.5, 1.0]))
    assert np.isfinite(y).all()


def test_curve_validation() -> None:
    with pytest.raises(NoiseModelError, match="unknown"):
        Curve("spline", (1.0,))
    with pytest.raises(NoiseModelError, match="needs 2"):
        Curve("loglin", (1.0,))
    with pytest.raises(NoiseModelError, match=">= 6"):
        Curve("split", (0.1, 1.0))
    with pytest.raises(NoiseModelError, match="finite"):
        Curve("const", (math.nan,))


def test_negative_sigma_is_clipped() -> None:
    m = NoiseModel("neg", 0.0, 10.0, prog_sigma=Curve("poly", (-1.0, 2.0)))
    s = m.sigma_prog(np.array([0.0, 2.0, 10.0]))
    assert (s >= 0).all() and s[0] == 0.0 and s[2] == pytest.approx(1.0)


def _hermes_published_nu_mean(x: np.ndarray) -> np.ndarray:
    lo = np.clip(-0.0387 * np.log(x) - 0.0182, 0.0720, 0.13)
    return np.where(x < 0.0945, lo, -0.0436 * x ** 2 - 0.0126 * x + 0.0736)


def _hermes_published_qs(x: np.ndarray) -> np.ndarray:
    lo = np.clip(-0.0117 * np.log(x) - 0.0069, 0.015, 0.04)
    return np.where(x < 0.16, lo, 0.0069 * x ** 3 - 0.0280 * x ** 2 + 0.0211 * x + 0.0123)


def test_hermes_matches_published_piecewise() -> None:
    m = pcm_hermes2023()
    x = np.concatenate([np.geomspace(1e-3, 0.09, 50), np.linspace(0.1, 1.0, 50)])
    np.testing.assert_allclose(m.nu_mean(x), _hermes_published_nu_mean(x), rtol=1e-12)
    np.testing.assert_allclose(m.read_sigma(x), _hermes_published_qs(x), rtol=1e-12)
    assert m.t0 == 300.0 and m.t_read == 512e-9 and m.g_max == 20.7
    assert pcm_hermes2023(1).t0 == 200.0 and pcm_hermes2023(1).g_max == 10.35
    g = np.linspace(0, 20.7, 101)
    assert (m.sigma_prog(g) > 0).all() and (m.nu_std(g / 20.7) > 0).all()


def test_preset_argument_errors() -> None:
    with pytest.raises(NoiseModelError, match="1 or 2"):
        pcm_hermes2023(3)
    with pytest.raises(NoiseModelError, match="characterised"):
        pcm_hermes2023(2, g_max=30.0)
    with pytest.raises(NoiseModelError, match="t_eval"):
        rram_wan2022(5.0)
    with pytest.raises(NoiseModelError, match="g_max"):
        rram_wan2022(1.0, g_max=0.0)


@pytest.mark.parametrize("t_eval", [1.0, 86400.0, 172800.0])
def test_wan_sigma_positive_and_scaled(t_eval: float) -> None:
    g = np.linspace(0, 40, 201)
    s = rram_wan2022(t_eval).sigma_prog(g)
    assert (s > 0).all()
    s20 = rram_wan2022(t_eval, g_max=20.0).sigma_prog(g / 2)
    np.testing.assert_allclose(s20, s / 2, rtol=1e-6)


def test_resolve_specs() -> None:
    assert resolve("rram@2").prog_scale == 2.0
    assert resolve("rram:86400").name == "rram-wan2022-t86400"
    assert resolve("hermes:1").name == "pcm-hermes2023-1dev"
    with pytest.raises(NoiseModelError):
        resolve("nope")


# ---- sampling statistics (n = 200k: relative SE of a std is 1/sqrt(2n) = 0.16 %; tolerances 2 %) ----


@pytest.mark.parametrize("spec", ["pcm", "hermes", "rram"])
def test_programmed_std_matches_sigma(spec: str) -> None:
    m = resolve(spec)
    rng = np.random.default_rng(3)
    g_t = np.full(200_000, 0.6 * m.g_max)
    d = m.programmed(g_t, rng) - g_t
    assert d.std() == pytest.approx(float(m.sigma_prog(np.array(0.6 * m.g_max))), rel=0.02)
    assert abs(d.mean()) < 4 * d.std() / math.sqrt(d.size)


def test_drift_mean_and_stuck_rates() -> None:
    m = replace(pcm_hermes2023(), p_stuck_low=0.02, p_stuck_high=0.01)
    rng = np.random.default_rng(4)
    n = 200_000
    g_t = np.full(n, 0.5 * m.g_max)
    nu = m.drift_exponents(g_t, rng)
    assert nu.mean() == pytest.approx(float(m.nu_mean(np.array(0.5))), rel=0.02)
    assert nu.std() == pytest.approx(float(m.nu_std(np.array(0.5))), rel=0.05)
    codes = m.stuck_codes((n,), rng)
    for code, p in ((1, 0.02), (2, 0.01)):
        assert abs((codes == code).mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
    # drift without noise: median ratio follows ((t + t0)/t0)^-nu_mean
    quiet = m.scaled(prog=0.0, read=0.0)
    g = quiet.at_time(g_t, 3600.0, rng, nu=np.full(n, 0.05))
    np.testing.assert_allclose(g, g_t * ((3600 + m.t0) / m.t0) ** -0.05, rtol=1e-5)


def test_direct_mapping_gaussian() -> None:
    m = gaussian_relative(0.1)
    rng = np.random.default_rng(5)
    w = np.zeros(200_000)
    out = m.sample(w, 0.0, rng)
    assert (out < 0).any()  # signed weights are not floored
    assert out.std() == pytest.approx(0.1, rel=0.02)


def test_float32_path_keeps_dtype() -> None:
    m = resolve("pcm")
    g = np.linspace(0, 25, 1000, dtype=np.float32)
    assert m.sample(g, 60.0, np.random.default_rng(0)).dtype == np.float32
