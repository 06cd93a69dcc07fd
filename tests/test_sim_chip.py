"""Physics of the simulated chip: statistics against its ground truth, with fixed seeds."""

from __future__ import annotations

import numpy as np
import pytest

from hil.profile import ChipProfile
from hil.protocol import ProgramSettings, Region
from hil.sim.chip import SimChip, chip_truth

PROFILE = ChipProfile(tiles=1, rows=128, cols=256, block_max_cells=128 * 256)
FULL = Region(0, 0, 0, 128, 256)


@pytest.fixture(scope="module")
def programmed() -> tuple[SimChip, np.ndarray]:
    chip = SimChip(PROFILE, chip_truth("pcm-chip"), seed=11)
    targets = np.random.default_rng(0).uniform(0, 25, FULL.size).astype(np.float32)
    chip.program(FULL, targets, ProgramSettings())
    return chip, targets


def test_programming_error_matches_truth_sigma(programmed) -> None:
    chip, tgt = programmed
    healthy = chip.stuck[0].reshape(-1) == 0
    err = chip.g_prog[0].reshape(-1) - tgt
    for lo in (2.0, 10.0, 20.0):
        m = healthy & (tgt >= lo) & (tgt < lo + 4)
        want = float(chip.truth.sigma_prog(np.array([lo + 2.0]))[0])
        # ~3,000 cells per bin: the std's sampling error is ~1.3 %; the loop leaves a non-Gaussian residue
        assert np.std(err[m]) == pytest.approx(want, rel=0.12)
        assert abs(np.mean(err[m])) < ProgramSettings().tolerance_us  # verify stops within tolerance


def test_write_verify_converges_and_counts_pulses(programmed) -> None:
    chip, _ = programmed
    healthy = chip.stuck[0] == 0
    assert chip.verified[0][healthy].mean() > 0.99
    assert not chip.verified[0][~healthy].any()


def test_lower_pulse_amplitude_needs_more_pulses() -> None:
    tgt = np.full(FULL.size, 20.0, np.float32)
    a = SimChip(PROFILE, chip_truth("pcm"), seed=1).program(FULL, tgt, ProgramSettings(v_max=2.5))[0]
    b = SimChip(PROFILE, chip_truth("pcm"), seed=1).program(FULL, tgt, ProgramSettings(v_min=0.5, v_max=0.8))[0]
    assert b.mean() > a.mean() + 2


def test_stuck_rates_and_report(programmed) -> None:
    chip, _ = programmed
    n = chip.stuck.size
    assert (chip.stuck == 1).mean() == pytest.approx(0.005, abs=4 * np.sqrt(0.005 / n))
    assert (chip.stuck == 2).mean() == pytest.approx(0.002, abs=4 * np.sqrt(0.002 / n))
    rep = chip.stuck_report(FULL).reshape(chip.stuck[0].shape)
    low = chip.stuck[0] == 1
    assert (rep[low] == 1).mean() > 0.9  # stuck-low cells whose target is far from 0 are all found
    assert (rep[chip.stuck[0] == 0] != 0).mean() < 0.002


def test_drift_follows_power_law(programmed) -> None:
    chip, tgt = programmed
    healthy = (chip.stuck[0].reshape(-1) == 0) & (tgt > 5)
    g_prog = chip.g_prog[0].reshape(-1)
    t_end = chip.clock
    chip.advance_to(t_end + 86400.0)
    g_day = chip.true_conductance(FULL).reshape(-1)
    nu_est = -np.log(g_day[healthy] / g_prog[healthy]) / np.log((86400.0 + 20.0) / 20.0)
    nu_truth = chip.truth.nu_mean(tgt[healthy] / 25.0)
    assert np.mean(nu_est) == pytest.approx(np.mean(np.abs(nu_truth)), rel=0.1)


def test_reads_are_noisy_quantised_and_keyed_on_the_clock() -> None:
    chip = SimChip(PROFILE, chip_truth("pcm"), seed=2)
    chip.program(FULL, np.full(FULL.size, 12.5, np.float32), ProgramSettings())
    chip.advance_to(chip.clock + 10)
    a, b = chip.read(FULL), chip.read(FULL)
    assert np.array_equal(a, b)  # same instant, same read
    chip.advance_to(chip.clock + 1e-3)
    c = chip.read(FULL)
    assert not np.array_equal(a, c)
    steps = np.unique(np.round(a / chip.adc_lsb, 3) % 1)
    assert np.allclose(steps, 0)  # on the ADC grid
    rel = np.std(c - a) / np.sqrt(2) / 12.5
    x = 12.5 / 25.0
    want = 0.0088 * x ** -0.65 * np.sqrt(np.log((10 + 20 + 2.5e-7) / 5e-7))
    assert rel == pytest.approx(want, rel=0.1)


def test_targets_outside_range_refused() -> None:
    chip = SimChip(PROFILE, chip_truth("pcm"), seed=2)
    with pytest.raises(ValueError, match="within"):
        chip.program(Region(0, 0, 0, 1, 2), np.array([1.0, 30.0]), ProgramSettings())


def test_state_persists(tmp_path) -> None:
    a = SimChip(PROFILE, chip_truth("pcm"), seed=5)
    a.program(FULL, np.full(FULL.size, 7.0, np.float32), ProgramSettings())
    a.save_state(tmp_path / "chip.npz")
    b = SimChip(PROFILE, chip_truth("pcm"), seed=5)
    b.load_state(tmp_path / "chip.npz")
    assert np.array_equal(a.read(FULL), b.read(FULL))
    with pytest.raises(ValueError, match="seed"):
        SimChip(PROFILE, chip_truth("pcm"), seed=6).load_state(tmp_path / "chip.npz")
