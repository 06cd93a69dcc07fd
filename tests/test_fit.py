"""Fitting: parameter recovery on synthetic dumps sampled from known models, and bad-input errors.

Tolerances (N = 20 000 cells, 4 times x 3 repeats, 32 bins of ~600 cells):
- sigma_prog(g) at g/g_max in [0.1, 0.95]: 8 % relative. Per-bin sigma has relative SE
  1/sqrt(2 * 600) ~ 3 %; the polynomial pools bins (observed bootstrap 95 % half-widths 2-4 %);
  the remainder covers the read-noise subtraction (read noise is ~1/2 of prog noise for PCM).
- nu_mean: 10 % pointwise where the true curve is in the fitted family (PCM, loglin with clips),
  population mean over cells otherwise (HERMES split curves are not in the family).
- read noise: 12 % at g/g_max in [0.25, 1] (power law fitted to 80k repeat variances).
- stuck rates: 4 binomial SEs on the eligible cells (~15k), i.e. ~0.003 at p = 0.01.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from noise_fit.fit import DumpError, FitConfig, fit_dump
from noise_fit.model import NoiseModel
from noise_fit.presets import resolve
from tests.dumpgen import write_dump

N = 20_000
P_LOW, P_HIGH = 0.01, 0.005


def _truth(spec: str) -> NoiseModel:
    return replace(resolve(spec), p_stuck_low=P_LOW, p_stuck_high=P_HIGH)


def _cfg(m: NoiseModel, **kw) -> FitConfig:
    return FitConfig(t0=m.t0, t_read=m.t_read, n_boot=kw.pop("n_boot", 10), **kw)


@pytest.fixture(scope="module")
def fits(tmp_path_factory) -> dict[str, tuple[NoiseModel, NoiseModel, dict]]:
    out = {}
    for spec, seed in (("pcm", 1), ("hermes", 2), ("rram", 3), ("pcm", 11)):
        m = _truth(spec)
        p = tmp_path_factory.mktemp("d") / f"{spec}{seed}.h5"
        s = write_dump(p, m, n_cells=N, seed=seed)
        out[f"{spec}{seed}"] = (m, fit_dump(p, _cfg(m)).model, s)
    return out


KEYS = ["pcm1", "hermes2", "rram3", "pcm11"]


@pytest.mark.parametrize("key", KEYS)
def test_recover_sigma_prog(fits, key: str) -> None:
    m, f, _ = fits[key]
    g = np.linspace(0.1, 0.95, 18) * m.g_max
    np.testing.assert_allclose(f.sigma_prog(g), m.sigma_prog(g), rtol=0.08)


@pytest.mark.parametrize("key", KEYS)
def test_recover_stuck_rates(fits, key: str) -> None:
    _, f, _ = fits[key]
    st = f.diagnostics["stuck"]
    for p_true, p_fit, n in ((P_LOW, f.p_stuck_low, st["n_eligible_low"]),
                             (P_HIGH, f.p_stuck_high, st["n_eligible_high"])):
        assert abs(p_fit - p_true) < 4 * math.sqrt(p_true * (1 - p_true) / n)


@pytest.mark.parametrize("key", ["pcm1", "pcm11"])
def test_recover_drift_pointwise(fits, key: str) -> None:
    m, f, _ = fits[key]
    x = np.array([0.1, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(f.nu_mean(x), m.nu_mean(x), rtol=0.10)
    np.testing.assert_allclose(f.nu_std(x), m.nu_std(x), rtol=0.25, atol=0.002)


def test_recover_drift_population_hermes(fits) -> None:
    m, f, s = fits["hermes2"]
    ok = (s["stuck"] == 0) & (s["g_prog"] > 0.1 * m.g_max)
    x = s["g_prog"][ok] / m.g_max
    assert f.nu_mean(x).mean() == pytest.approx(s["nu"][ok].mean(), rel=0.10)


def test_no_drift_device(fits) -> None:
    _, f, _ = fits["rram3"]
    x = np.linspace(0.05, 1, 20)
    assert np.abs(f.nu_mean(x)).max() < 2e-3
    assert f.read_sigma(x).max() == 0.0


@pytest.mark.parametrize("key", ["pcm1", "hermes2"])
def test_recover_read_noise(fits, key: str) -> None:
    m, f, _ = fits[key]
    assert f.read_relative and f.read_time_law == "log1f"
    g = np.array([0.25, 0.5, 0.75, 1.0]) * m.g_max
    if key.startswith("pcm"):
        np.testing.assert_allclose(f.sigma_read(g, 60.0), m.sigma_read(g, 60.0), rtol=0.12)
    else:  # split curve outside the power-law family: level within 15 % on average
        r = f.sigma_read(g, 60.0) / m.sigma_read(g, 60.0)
        assert abs(np.mean(r) - 1) < 0.15


def test_diagnostics_complete(fits) -> None:
    m, f, _ = fits["pcm1"]
    d = f.diagnostics
    json.dumps(d)  # serialisable
    ci = d["bootstrap"]["ci95"]
    for k in ("p_stuck_low", "p_stuck_high", "read.a", "read.b", "prog.c0", "nu_mean.c0", "sigma_prog@x=0.5"):
        assert k in ci and ci[k][0] <= ci[k][1]
    lo, hi = ci["sigma_prog@x=0.5"]
    truth = float(m.sigma_prog(np.array(0.5 * m.g_max)))
    assert lo - 0.05 * truth < truth < hi + 0.05 * truth
    gof = d["goodness_of_fit"]
    assert gof["prog"]["ks_stat"] < 0.03 and gof["drift"]["ks_stat"] < 0.05
    assert f.provenance["source"] == "fit" and "dumpgen" in f.provenance["device_idn"]
    assert f.provenance["fit_config"]["t0"] == m.t0


def test_bootstrap_seeded(tmp_path) -> None:
    m = _truth("pcm")
    p = tmp_path / "d.h5"
    write_dump(p, m, n_cells=3000, seed=5)
    a = fit_dump(p, _cfg(m, n_boot=5, seed=7)).model.diagnostics["bootstrap"]["ci95"]
    b = fit_dump(p, _cfg(m, n_boot=5, seed=7)).model.diagnostics["bootstrap"]["ci95"]
    assert a == b


def test_device_flags_used_and_compared(tmp_path) -> None:
    m = _truth("pcm")
    p = tmp_path / "d.h5"
    s = write_dump(p, m, n_cells=8000, seed=6, device_flags=True)
    f = fit_dump(p, _cfg(m, n_boot=0)).model
    df = f.diagnostics["stuck"]["device_flags"]
    assert df["n_known"] == 8000 and df["agreement_on_detectable"] > 0.99
    assert f.p_stuck_low == pytest.approx((s["stuck"] == 1).mean(), abs=1e-9)


def test_too_few_times_drops_drift_with_warning(tmp_path) -> None:
    m = _truth("pcm")
    p = tmp_path / "d.h5"
    write_dump(p, m, n_cells=3000, times=(1.0, 60.0), seed=7)
    r = fit_dump(p, _cfg(m, n_boot=0))
    assert any("drift not fitted" in w for w in r.warnings)
    assert r.model.diagnostics["drift"]["left_out"] is True
    assert r.model.nu_mean.coeffs == (0.0,)


def test_single_repeat_skips_read_noise(tmp_path) -> None:
    m = _truth("pcm")
    p = tmp_path / "d.h5"
    write_dump(p, m, n_cells=3000, repeats=1, seed=8)
    r = fit_dump(p, _cfg(m, n_boot=0))
    assert any("read noise not fitted" in w for w in r.warnings)


# ---- bad input ------------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path) -> Path:
    p = tmp_path / "good.h5"
    write_dump(p, _truth("pcm"), n_cells=200, seed=9)
    return p


def _edit(p: Path, fn) -> Path:
    with h5py.File(p, "r+") as f:
        fn(f)
    return p


def _replace(f: h5py.File, name: str, data: np.ndarray, units: str | None = "uS") -> None:
    del f[name]
    ds = f.create_dataset(name, data=data)
    if units is not None:
        ds.attrs["units"] = units


CASES = {
    "missing dataset": (lambda f: f.__delitem__("reads/g"), "'/reads/g' is missing"),
    "wrong shape": (lambda f: _replace(f, "reads/g", f["reads/g"][()][:, :, :10]), "expected (T, R, N)"),
    "nan target": (lambda f: _replace(f, "cells/g_target",
                                      np.where(np.arange(200) == 3, np.nan, f["cells/g_target"][()])),
                   "NaN/inf"),
    "negative target": (lambda f: _replace(f, "cells/g_target", -f["cells/g_target"][()] - 1), "negative"),
    "negative reads": (lambda f: _replace(f, "reads/g", f["reads/g"][()] - 10.0), "negative conductance"),
    "inf reads": (lambda f: _replace(f, "reads/g", np.full(f["reads/g"].shape, np.inf, np.float32)), "infinite"),
    "wrong units": (lambda f: f["reads/g"].attrs.__setitem__("units", "S"), "units 'S', expected 'uS'"),
    "missing units": (lambda f: f["reads/t"].attrs.__delitem__("units"), "no 'units' attribute"),
    "all nan": (lambda f: _replace(f, "reads/g", np.full(f["reads/g"].shape, np.nan, np.float32)), "empty dump"),
    "empty": (lambda f: (_replace(f, "reads/g", np.zeros((4, 0, 200), np.float32))), "empty dump"),
    "wrong schema": (lambda f: f.attrs.__setitem__("schema", "other"), "schema"),
    "unsorted times": (lambda f: _replace(f, "reads/t", np.array([5.0, 1.0, 2.0, 3.0]), "s"), "increasing"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_clear_error(good: Path, case: str) -> None:
    fn, msg = CASES[case]
    _edit(good, fn)
    with pytest.raises(DumpError) as e:
        fit_dump(good, FitConfig(n_boot=0))
    assert str(good) in str(e.value) and msg in str(e.value)


def test_missing_file_and_not_hdf5(tmp_path) -> None:
    with pytest.raises(DumpError, match="does not exist"):
        fit_dump(tmp_path / "nope.h5")
    p = tmp_path / "x.h5"
    p.write_text("hello")
    with pytest.raises(DumpError, match="not an HDF5 file"):
        fit_dump(p)


def test_too_few_cells(tmp_path) -> None:
    p = tmp_path / "small.h5"
    write_dump(p, _truth("pcm"), n_cells=5, seed=1)
    with pytest.raises(DumpError, match="too few cells"):
        fit_dump(p, FitConfig(n_boot=0))


# ---- CLI --------------------------------------------------------------------------------------------


def test_cli_fit(tmp_path, good: Path) -> None:
    from hil.cli import app

    runner = CliRunner()
    out, png = tmp_path / "n.json", tmp_path / "fit.png"
    r = runner.invoke(app, ["fit", str(good), "--out", str(out), "--report", str(png), "--n-boot", "3"])
    assert r.exit_code == 0, r.output
    assert NoiseModel.from_json(out).provenance["dump"] == str(good)
    assert png.stat().st_size > 10_000
    r = runner.invoke(app, ["fit", str(good), "--out", str(out), "--json", "--n-boot", "0"])
    assert r.exit_code == 0 and json.loads(r.stdout.strip().splitlines()[-1])["schema"] == "romer-hil/noise-model"
    r = runner.invoke(app, ["fit", str(tmp_path / "missing.h5")])
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output
