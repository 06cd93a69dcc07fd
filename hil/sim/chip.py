"""Device physics of a simulated analog CIM chip.

The ground truth is a `noise_fit.NoiseModel` (by default PCM, Joshi et al. 2020), but the chip
does not simply sample it: programming is an iterative write-verify loop with a stochastic
per-pulse response and per-cell (device-to-device) efficiency, verified with noisy reads, so the
residual programming error is an outcome of the loop; after verify, the cell relaxes with the
truth's residual spread. Drift follows each cell's own exponent, every read adds read noise and
ADC quantisation, stuck cells ignore pulses. Time is a simulated device clock.

Determinism: all randomness is keyed on (seed, operation, region, device clock), so a repeated
operation at the same instant gives the same answer. This is what lets an interrupted measurement
resume to a dump identical to an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from hil.profile import ChipProfile
from hil.protocol import ProgramSettings, Region
from noise_fit.model import NoiseModel
from noise_fit.presets import pcm_joshi2020, resolve

_OP_STATIC, _OP_PROGRAM, _OP_READ = 0, 1, 2
VERIFY_AVERAGES = 4  # reads averaged per verify step (as write-verify firmware does)


@dataclass(frozen=True)
class SimPhysics:
    """Knobs of the simulated device that the noise model does not describe."""

    d2d_sigma: float = 0.2  # log-normal spread of per-cell pulse efficiency
    pulse_noise: float = 0.25  # relative spread of one pulse's conductance change
    pulse_abs_noise: float = 0.05  # absolute per-pulse noise, µS
    adc_bits: int = 12
    adc_headroom: float = 1.2  # ADC full scale = headroom * g_max
    reset_level: float = 0.1  # µS, conductance after the initial RESET of write-verify
    pulse_time_s: float = 2e-6  # device time of one pulse + verify, per row (rows are serial)


def chip_truth(spec: str = "pcm-chip") -> NoiseModel:
    """Ground truth of the simulated chip. ``pcm-chip`` (the default) is the published PCM model
    (Joshi et al. 2020) plus stuck-at faults at rates we assume (0.5 % low, 0.2 % high; the paper
    gives none) so that fitting has stuck cells to find; ``pcm-chip@4`` scales its programming
    noise 4x (a noisier chip). Anything else goes to `presets.resolve`."""
    name, _, scale = spec.partition("@")
    if name == "pcm-chip":
        base = pcm_joshi2020()
        model = replace(base, name="pcm-joshi2020+stuck", p_stuck_low=0.005, p_stuck_high=0.002,
                        provenance={**base.provenance, "stuck": "assumed rates, not published"})
        if scale:
            try:
                model = model.scaled(prog=float(scale))
            except ValueError:
                raise ValueError(f"truth {spec!r}: scale after '@' must be a number") from None
            model = replace(model, name=f"{model.name}@{scale}")
        return model
    return resolve(spec)


class SimChip:
    """State and physics of the simulated chip (no protocol, no I/O)."""

    def __init__(self, profile: ChipProfile, truth: NoiseModel, seed: int = 0,
                 physics: SimPhysics | None = None) -> None:
        if abs(truth.g_max - profile.g_max) > 1e-9 or truth.mapping != "differential":
            raise ValueError(f"truth model {truth.name!r} (g_max {truth.g_max} µS, mapping {truth.mapping}) does not "
                             f"match the chip profile (g_max {profile.g_max} µS, differential devices)")
        self.profile = profile
        self.truth = truth
        self.seed = int(seed)
        self.physics = physics or SimPhysics()
        shape = (profile.tiles, profile.rows, profile.cols)
        rng = self._rng(_OP_STATIC)
        self.gain = np.exp(self.physics.d2d_sigma * rng.standard_normal(shape, dtype=np.float32))
        self.nu_z = rng.standard_normal(shape, dtype=np.float32)
        self.stuck = truth.stuck_codes(shape, rng)
        self.g_prog = np.full(shape, self.physics.reset_level, dtype=np.float32)
        self.g_prog[self.stuck == 1] = truth.g_stuck_low
        self.g_prog[self.stuck == 2] = truth.stuck_high_value
        self.nu = np.zeros(shape, dtype=np.float32)
        self.t_prog = np.zeros(shape, dtype=np.float64)
        self.programmed = np.zeros(shape, dtype=bool)
        self.verified = np.zeros(shape, dtype=bool)
        self.target = np.zeros(shape, dtype=np.float32)
        self.clock = 0.0
        lsb_range = self.physics.adc_headroom * profile.g_max
        self.adc_lsb = lsb_range / (2 ** self.physics.adc_bits - 1)

    # ---- helpers -----------------------------------------------------------------------------
    def _rng(self, op: int, *key: int) -> np.random.Generator:
        return np.random.Generator(np.random.Philox(np.random.SeedSequence([self.seed, op, *key])))

    def _clock_key(self) -> int:
        return int(round(self.clock * 1e9))

    def check_region(self, r: Region) -> None:
        self.profile.check_region(r)

    def _view(self, a: np.ndarray, r: Region) -> np.ndarray:
        return a[r.tile, r.row0:r.row0 + r.nrows, r.col0:r.col0 + r.ncols]

    # ---- operations --------------------------------------------------------------------------
    def program(self, r: Region, targets: np.ndarray, s: ProgramSettings) -> tuple[np.ndarray, np.ndarray]:
        """Write-verify a block to targets (µS); NaN targets leave their cells untouched.

        Returns per-cell pulse counts and verified flags (1 verified, 0 failed, -1 skipped)."""
        self.check_region(r)
        p, ph, truth = self.profile, self.physics, self.truth
        raw = np.asarray(targets, dtype=np.float32).reshape(r.nrows, r.ncols)
        sel = ~np.isnan(raw)
        tgt = np.where(sel, raw, np.float32(p.g_min))
        if np.isinf(tgt).any() or tgt.min() < p.g_min or tgt.max() > p.g_max:
            raise ValueError(f"targets must be finite (or NaN to skip) and within [{p.g_min}, {p.g_max}] µS")
        rng = self._rng(_OP_PROGRAM, r.tile, r.row0, r.col0, r.nrows, r.ncols, self._clock_key())
        stuck = self._view(self.stuck, r)
        gain = self._view(self.gain, r)
        healthy = (stuck == 0) & sel
        g = np.where(healthy, np.float32(ph.reset_level), self._view(self.g_prog, r)).astype(np.float32)
        pulses = np.zeros(tgt.shape, dtype=np.int16)
        active = healthy.copy()
        verify_sigma = truth.read_scale * np.maximum(truth.read_sigma(tgt / truth.g_max), 0.0)
        verify_sigma = (verify_sigma * np.maximum(tgt, ph.reset_level) / np.sqrt(VERIFY_AVERAGES)).astype(np.float32)
        span = p.g_max - p.g_min
        for _ in range(s.max_pulses):
            meas = g + verify_sigma * rng.standard_normal(g.shape, dtype=np.float32)
            err = tgt - meas
            active &= np.abs(err) > s.tolerance_us
            if not active.any():
                break
            amp = np.clip(s.v_min + (s.v_max - s.v_min) * 4.0 * np.abs(err) / span, s.v_min, s.v_max)
            eff = gain * (amp / p.v_prog_max) * min(1.0, (s.width_max_ns / 100.0) ** 0.5)
            step = eff * err * (1 + ph.pulse_noise * rng.standard_normal(g.shape, dtype=np.float32))
            step += ph.pulse_abs_noise * rng.standard_normal(g.shape, dtype=np.float32)
            g = np.where(active, np.clip(g + step, 0.0, ph.adc_headroom * p.g_max), g).astype(np.float32)
            pulses += active
        # the last verify passed for cells no longer active; stuck cells never verify
        verified = (~active) & healthy
        # post-verify relaxation: the spread the truth's sigma_prog describes, less what the loop left
        sig_prog = truth.sigma_prog(tgt).astype(np.float32)
        sig_relax = np.sqrt(np.maximum(sig_prog ** 2 - s.tolerance_us ** 2 / 3.0, 0.0))
        relaxed = np.maximum(g + sig_relax * rng.standard_normal(g.shape, dtype=np.float32), 0.0)
        g = np.where(healthy, relaxed, g)
        x = tgt / truth.g_max
        nu = np.abs(truth.nu_mean(x) + truth.nu_std(x) * self._view(self.nu_z, r)) * truth.drift_scale
        self.clock += int(pulses.max(initial=0)) * ph.pulse_time_s * r.nrows
        for name, value in (("g_prog", g), ("nu", np.where(stuck == 0, nu, 0.0)), ("t_prog", self.clock),
                            ("programmed", True), ("verified", verified), ("target", tgt)):
            view = self._view(getattr(self, name), r)
            view[sel] = value[sel] if isinstance(value, np.ndarray) else value
        pulses[(stuck != 0) & sel] = s.max_pulses
        flags = np.where(sel, verified, -1).astype(np.int8)
        return pulses.reshape(-1), flags.reshape(-1)

    def true_conductance(self, r: Region) -> np.ndarray:
        """Noise-free conductance of a block at the current clock (drift applied)."""
        self.check_region(r)
        return self._view(self.g_prog, r) * self.truth.drift_factor(self._view(self.nu, r), self._age(r))

    def _age(self, r: Region) -> np.ndarray:
        """Time since each cell of the block was programmed, s."""
        return np.maximum(self.clock - self._view(self.t_prog, r), 0.0)

    def read(self, r: Region) -> np.ndarray:
        """One read of a block: drifted conductance + read noise, through the ADC (µS, float32)."""
        g = self.true_conductance(r).astype(np.float32)
        sig = self.truth.sigma_read(g, self._age(r))
        rng = self._rng(_OP_READ, r.tile, r.row0, r.col0, r.nrows, r.ncols, self._clock_key())
        noisy = g + sig.astype(np.float32) * rng.standard_normal(g.shape, dtype=np.float32)
        codes = np.clip(np.rint(noisy / self.adc_lsb), 0, 2 ** self.physics.adc_bits - 1)
        return (codes * self.adc_lsb).astype(np.float32).reshape(-1)

    def stuck_report(self, r: Region) -> np.ndarray:
        """What the chip's self-test reports: -1 never programmed, 0 ok, 1/2 failed verify at low/high rail."""
        self.check_region(r)
        prog = self._view(self.programmed, r)
        ver = self._view(self.verified, r)
        g = self._view(self.g_prog, r)
        code = np.where(ver, 0, np.where(g < 0.5 * self.profile.g_max, 1, 2)).astype(np.int8)
        # a cell that failed verify but is not at a rail is reported 0 (not a stuck cell, just imprecise)
        at_rail = (g <= self.truth.g_stuck_low + 1e-3) | (g >= self.truth.stuck_high_value - 1e-3)
        far = np.abs(g - self._view(self.target, r)) > 1.0  # µS: a cell sitting on its target is not stuck
        code[~ver & ~(at_rail & far)] = 0
        code[~prog] = -1
        return code.reshape(-1)

    def advance_to(self, t_abs: float) -> float:
        if t_abs > self.clock:
            self.clock = float(t_abs)
        return self.clock

    # ---- non-volatile state --------------------------------------------------------------------
    _STATE = ("g_prog", "nu", "t_prog", "programmed", "verified", "target")

    def save_state(self, path: Path) -> None:
        """Snapshot what a real chip keeps when the host goes away (conductances are non-volatile)."""
        tmp = Path(str(path) + ".tmp.npz")
        np.savez(tmp, clock=np.float64(self.clock), seed=np.int64(self.seed),
                 **{k: getattr(self, k) for k in self._STATE})
        tmp.replace(path)
        journal = Path(str(path) + ".journal")
        if journal.exists():
            journal.unlink()

    def journal_program(self, path: Path, r: Region) -> None:
        """Append one programming operation to the snapshot's journal: O(block), not O(chip)."""
        with open(Path(str(path) + ".journal"), "ab") as fh:
            np.save(fh, np.array([r.tile, r.row0, r.col0, r.nrows, r.ncols], np.int64), allow_pickle=False)
            np.save(fh, np.array([self.clock]), allow_pickle=False)
            for k in self._STATE:
                np.save(fh, np.ascontiguousarray(self._view(getattr(self, k), r)), allow_pickle=False)
            fh.flush()  # survives a killed process; power loss is not what the simulator models

    def load_state(self, path: Path) -> None:
        """Load a snapshot, then replay its journal (a torn last record is ignored: it was never acknowledged)."""
        path = Path(path)
        if path.exists():
            with np.load(path) as z:
                if int(z["seed"]) != self.seed:
                    raise ValueError(f"chip state {path} was written by a chip with seed {int(z['seed'])}, "
                                     f"not {self.seed}")
                for k in self._STATE:
                    if z[k].shape != getattr(self, k).shape:
                        raise ValueError(f"chip state {path}: {k} has shape {z[k].shape}, "
                                         f"chip has {getattr(self, k).shape}")
                    getattr(self, k)[...] = z[k]
                self.clock = float(z["clock"])
        journal = Path(str(path) + ".journal")
        if journal.exists():
            with open(journal, "rb") as fh:
                while True:
                    try:
                        reg = np.load(fh, allow_pickle=False)
                        clock = float(np.load(fh, allow_pickle=False)[0])
                        arrays = [np.load(fh, allow_pickle=False) for _ in self._STATE]
                    except (ValueError, EOFError, OSError):
                        break
                    r = Region(*(int(v) for v in reg))
                    for k, a in zip(self._STATE, arrays, strict=True):
                        self._view(getattr(self, k), r)[...] = a
                    self.clock = max(self.clock, clock)
