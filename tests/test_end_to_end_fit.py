"""Measure the simulated chip through the real driver path, fit the dump, compare with the truth.

The simulated chip does not sample its truth directly (write-verify loop, ADC, device-to-device
variation), so these tolerances are wider than the synthetic-dump recovery tests in test_fit.py:
- sigma_prog within 10 % across the range: the loop's bias (it stops on the low side of the
  tolerance window) and the verify averaging add a few percent at low g;
- nu mean within 10 %; read-noise scale within 15 % (ADC quantisation adds variance at low g);
- stuck rates within 4 binomial sigmas, after removing the stuck-low cells whose target is 0
  (indistinguishable from healthy cells: 1 in `levels`).
"""

from __future__ import annotations

import numpy as np
import pytest

from hil.measure import MeasureConfig, run_measurement
from hil.sim.chip import chip_truth
from noise_fit.fit import FitConfig, fit_dump


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "dump.h5"
    run_measurement(MeasureConfig(out=str(out), rows=64, cols=256, repeats=3, seed=1, sim_seed=2))
    return fit_dump(out, FitConfig(n_boot=10)), chip_truth("pcm-chip")


def test_programming_noise_recovered(fitted) -> None:
    res, truth = fitted
    x = np.array([0.1, 0.3, 0.5, 0.7, 1.0])
    np.testing.assert_allclose(res.model.sigma_prog(x * truth.g_max), truth.sigma_prog(x * truth.g_max), rtol=0.10)


def test_drift_and_read_noise_recovered(fitted) -> None:
    res, truth = fitted
    for x in (0.1, 0.5, 0.9):
        assert float(res.model.nu_mean(np.array([x]))[0]) == pytest.approx(float(truth.nu_mean(np.array([x]))[0]),
                                                                           rel=0.10)
    g = np.array([5.0, 12.5, 25.0])
    for t in (1.0, 3600.0):
        np.testing.assert_allclose(res.model.sigma_read(g, t), truth.sigma_read(g, t), rtol=0.15)


def test_stuck_rates_recovered(fitted) -> None:
    res, truth = fitted
    n = 4 * 64 * 256
    detectable_low = truth.p_stuck_low * 15 / 16
    assert res.model.p_stuck_low == pytest.approx(detectable_low, abs=4 * np.sqrt(detectable_low / n))
    assert res.model.p_stuck_high == pytest.approx(truth.p_stuck_high, abs=4 * np.sqrt(truth.p_stuck_high / n))
    assert res.model.provenance.get("dump") or res.model.provenance.get("source")
