"""Fitting a `NoiseModel` from a measurement dump: stuck cells, read noise, drift, programming noise.

The stages separate the effects in the order that each needs the previous one:

1. per-cell reductions (one pass over the (T, R, N) reads): repeat mean and within-time
   variance per (time, cell);
2. stuck cells: mixture outliers that sit at ~0 or ~g_max at every time, far (in units of a
   robust per-target-bin spread) from their target; rates are counted among the cells where a
   stuck cell would be detectable; device flags (cells/stuck != -1) override where known;
3. read noise: within-time variance across repeats (chi-square likelihood), relative/absolute,
   const/power law in g, with/without 1/f time law, chosen by AIC;
4. drift: per-cell slope of ln g against ln((t + t0) / t0); nu_mean(g), nu_std(g) (const or
   loglin) by weighted regression on robust per-bin statistics, read noise removed;
5. programming noise: first-read repeat mean, drift back-corrected to t = 0, minus read and
   drift-spread variance; censored (at 0 µS) heteroscedastic Gaussian likelihood per bin, then a
   polynomial sigma_prog(g / g_max) by maximum likelihood, degree by BIC (or AIC).

Everything after step 1 works on bin statistics computed with `np.bincount`, so the fit is
linear in the number of measurements and a seeded Poisson bootstrap (per-cell weights) is cheap.
"""

from __future__ import annotations

import datetime as _dt
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize, special, stats

from noise_fit.io import Dump, DumpError, read_dump
from noise_fit.model import Curve, NoiseModel

__all__ = ["FitConfig", "FitResult", "FitArrays", "fit_dump", "fit_data", "DumpError"]

_GRID = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)  # x = g/g_max points where curves are reported with CIs


@dataclass(frozen=True)
class FitConfig:
    """Fit settings; recorded in the fitted model's provenance."""

    t0: float = 20.0  # drift reference time (s): g(t) = g_prog ((t + t0) / t0)^-nu
    t_read: float = 250e-9  # 1/f read-noise law parameter (s)
    seed: int = 0  # bootstrap and subsampling generator seed
    n_boot: int = 50  # bootstrap replicates (0: no confidence intervals)
    n_bins: int = 32  # bins in g for the binned likelihoods
    max_prog_degree: int = 4
    criterion: str = "bic"  # prog degree selection: "bic" or "aic"
    stuck_tol: float = 0.03  # a stuck cell sits within stuck_tol * g_max of 0 or g_max at every time
    stuck_k: float = 6.0  # ... and at least stuck_k robust sigmas away from its target
    use_device_flags: bool = True  # trust cells/stuck where it is not -1
    min_cells: int = 20
    min_drift_times: int = 3  # fewer distinct read times: drift is not fitted (warning)
    neg_tol: float = 0.01  # reads down to -neg_tol * g_max are instrument offset, clipped to 0
    ks_max_samples: int = 200_000
    name: str | None = None
    mapping: str = "differential"

    def __post_init__(self) -> None:
        if self.t0 <= 0 or self.t_read <= 0:
            raise ValueError(f"t0 and t_read must be > 0 s, got {self.t0}, {self.t_read}")
        if self.criterion not in ("bic", "aic"):
            raise ValueError(f"criterion must be 'bic' or 'aic', got {self.criterion!r}")
        if self.n_bins < 4 or self.max_prog_degree < 0 or self.n_boot < 0:
            raise ValueError("need n_bins >= 4, max_prog_degree >= 0, n_boot >= 0")


@dataclass
class FitArrays:
    """Binned data and per-cell samples kept for the report (not serialised)."""

    g_max: float
    prog_x: np.ndarray = field(default_factory=lambda: np.zeros(0))  # bin mean target / g_max
    prog_sigma: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per-bin sigma_prog (µS)
    prog_n: np.ndarray = field(default_factory=lambda: np.zeros(0))
    nu_x: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per-cell sample
    nu: np.ndarray = field(default_factory=lambda: np.zeros(0))
    read_g: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per-bin level (µS)
    read_sigma: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per-bin sigma (µS)
    read_t: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per-bin read time (s)
    stuck_tile: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    stuck_row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    stuck_col: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    stuck_code: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    n_tiles: int = 1


@dataclass
class FitResult:
    """The fitted model (diagnostics inside), warnings, and arrays for plotting."""

    model: NoiseModel
    warnings: list[str]
    arrays: FitArrays
    seconds: float = 0.0

    @property
    def diagnostics(self) -> dict[str, Any]:
        return self.model.diagnostics


# ---------------------------------------------------------------------------------------------
# small helpers


def _wbincount(idx: np.ndarray, w: np.ndarray | None, n: int) -> np.ndarray:
    return np.bincount(idx, weights=w, minlength=n)[:n]


def _quantile_edges(v: np.ndarray, n_bins: int, rng: np.random.Generator, max_n: int = 200_000) -> np.ndarray:
    s = v if v.size <= max_n else rng.choice(v, max_n, replace=False)
    e = np.unique(np.quantile(s, np.linspace(0, 1, n_bins + 1)))
    if e.size < 2:
        e = np.array([s.min() - 0.5, s.max() + 0.5])
    e[0], e[-1] = -np.inf, np.inf
    return e


def _ks_normal(z: np.ndarray, rng: np.random.Generator, max_n: int) -> dict[str, float]:
    z = z[np.isfinite(z)]
    if z.size < 8:
        return {"n": int(z.size), "ks_stat": float("nan"), "p_value": float("nan")}
    if z.size > max_n:
        z = rng.choice(z, max_n, replace=False)
    r = stats.kstest(z, "norm")
    return {"n": int(z.size), "ks_stat": float(r.statistic), "p_value": float(r.pvalue),
            "mean": float(z.mean()), "std": float(z.std())}


def _ks_uniform(u: np.ndarray, rng: np.random.Generator, max_n: int) -> dict[str, float]:
    u = u[np.isfinite(u)]
    if u.size < 8:
        return {"n": int(u.size), "ks_stat": float("nan"), "p_value": float("nan")}
    if u.size > max_n:
        u = rng.choice(u, max_n, replace=False)
    r = stats.kstest(u, "uniform")
    return {"n": int(u.size), "ks_stat": float(r.statistic), "p_value": float(r.pvalue)}


def _law(t: np.ndarray, law: str, t0: float, t_read: float) -> np.ndarray:
    t = np.asarray(t, dtype=np.float64)
    if law == "none":
        return np.ones_like(t)
    return np.sqrt(np.log((t + t0 + t_read) / (2.0 * t_read)))


def _ci(samples: list[float]) -> list[float]:
    a = np.asarray(samples, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size < 2:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(a, [2.5, 97.5])
    return [float(lo), float(hi)]


# ---------------------------------------------------------------------------------------------
# stage 1: reductions


@dataclass
class _Cells:
    """Per-(time, cell) reductions of the reads, computed once."""

    cnt: np.ndarray  # (T, N) int
    mean: np.ndarray  # (T, N) float64, NaN where cnt == 0
    var: np.ndarray  # (T, N) float64 within-time variance (ddof 1), NaN where cnt < 2
    first: np.ndarray  # (N,) index of the first time with a read, -1 if none


def _reduce(g: np.ndarray) -> _Cells:
    finite = np.isfinite(g)
    cnt = finite.sum(axis=1)
    gz = np.where(finite, g, np.float32(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = gz.sum(axis=1, dtype=np.float64) / cnt
        d = np.where(finite, gz - mean[:, None, :].astype(np.float32), np.float32(0))
        ss = np.einsum("trn,trn->tn", d, d, dtype=np.float64) if d.size else np.zeros(cnt.shape)
        var = np.where(cnt >= 2, ss / np.maximum(cnt - 1, 1), np.nan)
    mean = np.where(cnt > 0, mean, np.nan)
    has = cnt > 0
    first = np.where(has.any(axis=0), np.argmax(has, axis=0), -1)
    return _Cells(cnt=cnt, mean=mean, var=var, first=first)


# ---------------------------------------------------------------------------------------------
# stage 2: stuck cells


@dataclass
class _Stuck:
    low: np.ndarray  # (N,) bool
    high: np.ndarray
    elig_low: np.ndarray
    elig_high: np.ndarray
    g_low: float
    g_high: float | None
    diag: dict[str, Any]


def _robust_sigma_by_target(x_t: np.ndarray, r: np.ndarray, n_bins: int, g_max: float,
                            rng: np.random.Generator) -> np.ndarray:
    """Per-cell robust (MAD) spread of first-read minus target within its target bin (µS)."""
    ok = np.isfinite(r)
    idx_all = np.flatnonzero(ok)
    sub = idx_all if idx_all.size <= 200_000 else rng.choice(idx_all, 200_000, replace=False)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b_sub = np.clip(np.searchsorted(edges, x_t[sub], side="right") - 1, 0, n_bins - 1)
    sig = np.full(n_bins, np.nan)
    for b in range(n_bins):
        v = r[sub][b_sub == b]
        if v.size >= 5:
            sig[b] = 1.4826 * np.median(np.abs(v - np.median(v)))
    fill = np.nanmedian(sig) if np.isfinite(sig).any() else 0.01 * g_max
    sig = np.where(np.isfinite(sig), sig, fill)
    sig = np.maximum(sig, 1e-3 * g_max)
    b_all = np.clip(np.searchsorted(edges, x_t, side="right") - 1, 0, n_bins - 1)
    return sig[b_all]


def _stuck(d: Dump, c: _Cells, cfg: FitConfig, rng: np.random.Generator) -> _Stuck:
    n = d.g_target.size
    g_max = d.g_max
    x_t = d.g_target / g_max
    idx = np.arange(n)
    m1 = np.where(c.first >= 0, c.mean[np.maximum(c.first, 0), idx], np.nan)
    sig0 = _robust_sigma_by_target(x_t, m1 - d.g_target, cfg.n_bins, g_max, rng)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (unmeasured cells)
        hi_c = np.nanmax(c.mean, axis=0)
        lo_c = np.nanmin(c.mean, axis=0)
        # the cell's own read-noise scale widens the level tolerance (noisy reads of a stuck cell)
        sd_c = np.sqrt(np.nan_to_num(np.nanmean(c.var, axis=0)))
    r_c = np.maximum(c.cnt.max(axis=0), 1)
    tol = cfg.stuck_tol * g_max + 5.0 * sd_c / np.sqrt(r_c)
    margin = tol + cfg.stuck_k * sig0
    measured = np.isfinite(hi_c)
    elig_low = measured & (d.g_target > margin)
    elig_high = measured & (d.g_target < g_max - margin)
    # classification (excluded from the other fits) uses the cell's own distance from target;
    # the rates count only eligible cells, where any stuck cell would have been classified.
    low = measured & (hi_c <= tol) & (d.g_target - hi_c > cfg.stuck_k * sig0)
    at_high = measured & (lo_c >= g_max - tol)
    high = at_high & (lo_c - d.g_target > cfg.stuck_k * sig0)
    static = _static_cells(d, c, cfg, x_t)
    if static is not None:  # drifting device: a cell at g_max that does not move is stuck too
        high |= at_high & static
    diag: dict[str, Any] = {"method": "mixture outliers (level within tol of 0 / g_max at all times, "
                                      "> stuck_k robust sigma from target)",
                            "n_detected_low": int(low.sum()), "n_detected_high": int(high.sum())}
    known = d.stuck_flags >= 0
    if known.any():
        f = d.stuck_flags
        both = known & (elig_low | elig_high)
        stat_code = np.where(low, 1, np.where(high, 2, 0))
        diag["device_flags"] = {
            "n_known": int(known.sum()),
            "n_flag_low": int((known & (f == 1)).sum()),
            "n_flag_high": int((known & (f == 2)).sum()),
            "agreement_on_detectable": float((stat_code[both] == f[both]).mean()) if both.any() else None,
            "used": bool(cfg.use_device_flags),
        }
        if cfg.use_device_flags:
            low = np.where(known, f == 1, low)
            high = np.where(known, f == 2, high)
            elig_low = elig_low | known
            elig_high = elig_high | known
    g_low = float(np.median(c.mean[:, low][np.isfinite(c.mean[:, low])])) if low.any() else 0.0
    g_high_med = float(np.median(c.mean[:, high][np.isfinite(c.mean[:, high])])) if high.any() else g_max
    g_high = None if abs(g_high_med - g_max) <= cfg.stuck_tol * g_max / 3 else g_high_med
    return _Stuck(low=low, high=high, elig_low=elig_low, elig_high=elig_high, g_low=max(g_low, 0.0),
                  g_high=g_high, diag=diag)


def _static_cells(d: Dump, c: _Cells, cfg: FitConfig, x_t: np.ndarray) -> np.ndarray | None:
    """Cells whose ln g does not move with ln time while the population drifts (None: no drift seen)."""
    if int((c.cnt.sum(axis=1) > 0).sum()) < cfg.min_drift_times:
        return None
    L = np.log((d.t + cfg.t0) / cfg.t0)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.log(c.mean)
    v = np.isfinite(y)
    n = v.sum(axis=0)
    Lbar = np.where(v, L, 0.0).sum(axis=0) / np.maximum(n, 1)
    dL = np.where(v, L - Lbar, 0.0)
    sxx = (dL * dL).sum(axis=0)
    ok = (n >= cfg.min_drift_times) & (sxx > 1e-12)
    nu = np.full(x_t.size, np.nan)
    nu[ok] = -(dL * np.where(v, y, 0.0)).sum(axis=0)[ok] / sxx[ok]
    ref = ok & (x_t > 0.3)
    if ref.sum() < 20:
        return None
    med = float(np.median(nu[ref]))
    scale = 1.4826 * float(np.median(np.abs(nu[ref] - med)))
    if med - 3 * scale <= 0.0:
        return None
    return ok & (np.abs(nu) < 0.25 * med)


def _stuck_rates(s: _Stuck, w: np.ndarray | None) -> tuple[float, float]:
    def rate(m: np.ndarray, e: np.ndarray) -> float:
        den = float(e.sum()) if w is None else float(w[e].sum())
        num = float((m & e).sum()) if w is None else float(w[m & e].sum())
        return num / den if den > 0 else 0.0
    return rate(s.low, s.elig_low), rate(s.high, s.elig_high)


# ---------------------------------------------------------------------------------------------
# stage 3: read noise


@dataclass
class _ReadData:
    cell: np.ndarray  # (M,) cell index of each (time, cell) item
    bin: np.ndarray  # (M,) combined (time, x-bin) index
    k: np.ndarray  # dof
    ks2: np.ndarray  # dof * s^2
    lnx: np.ndarray
    g2: np.ndarray
    t: np.ndarray  # read time per item
    n_bins: int
    bin_t: np.ndarray  # time of each bin


@dataclass
class _ReadFit:
    relative: bool
    kind: str  # "const" | "power"
    law: str
    a: float
    b: float
    aic: dict[str, float]
    x_lo: float

    def sigma(self, g: np.ndarray, t: np.ndarray | float, g_max: float, t0: float, t_read: float) -> np.ndarray:
        x = np.maximum(np.abs(g) / g_max, 1e-6)
        s = self.a * (x ** self.b if self.kind == "power" else 1.0)
        if self.kind == "power" and self.b < 0:
            s = np.minimum(s, self.a * self.x_lo ** self.b)
        s = s * _law(np.asarray(t), self.law, t0, t_read)
        return s * np.abs(g) if self.relative else s * np.ones_like(np.asarray(g, dtype=np.float64))


def _read_data(d: Dump, c: _Cells, healthy: np.ndarray, cfg: FitConfig, rng: np.random.Generator) -> _ReadData | None:
    ok = (c.cnt >= 2) & healthy[None, :] & (c.mean > 0) & np.isfinite(c.var)
    ti, ci = np.nonzero(ok)
    if ti.size < 10:
        return None
    mean = c.mean[ti, ci]
    lnx = np.log(mean / d.g_max)
    nb = cfg.n_bins
    edges = _quantile_edges(lnx, nb, rng)
    xb = np.clip(np.searchsorted(edges, lnx, side="right") - 1, 0, edges.size - 2)
    nbx = edges.size - 1
    n_t = c.cnt.shape[0]
    k = (c.cnt[ti, ci] - 1).astype(np.float64)
    return _ReadData(cell=ci, bin=ti * nbx + xb, k=k, ks2=k * c.var[ti, ci], lnx=lnx, g2=mean * mean,
                     t=d.t[ti], n_bins=n_t * nbx, bin_t=np.repeat(d.t, nbx))


def _read_bins(rd: _ReadData, w: np.ndarray | None) -> tuple[np.ndarray, ...]:
    wi = None if w is None else w[rd.cell]
    kk = rd.k if wi is None else rd.k * wi
    K = _wbincount(rd.bin, kk, rd.n_bins)
    S = _wbincount(rd.bin, rd.ks2 if wi is None else rd.ks2 * wi, rd.n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        lnx = _wbincount(rd.bin, kk * rd.lnx, rd.n_bins) / K
        g2 = _wbincount(rd.bin, kk * rd.g2, rd.n_bins) / K
    m = K > 0
    return K[m], S[m], lnx[m], g2[m], rd.bin_t[m]


def _read_profile(K: np.ndarray, S: np.ndarray, lnx: np.ndarray, g2: np.ndarray, tb: np.ndarray,
                  relative: bool, b: float, law: str, cfg: FitConfig) -> tuple[float, float]:
    """Profile likelihood over the scale a for fixed exponent b: (a, -loglik)."""
    lnh = 2 * b * lnx + 2 * np.log(_law(tb, law, cfg.t0, cfg.t_read)) + (np.log(g2) if relative else 0.0)
    h = np.exp(lnh)
    a2 = float(np.sum(S / h) / np.sum(K))
    a2 = max(a2, 1e-300)
    nll = 0.5 * float(np.sum(K)) * (math.log(a2) + 1.0) + 0.5 * float(np.sum(K * lnh))
    return math.sqrt(a2), nll


def _fit_read(rd: _ReadData, cfg: FitConfig, w: np.ndarray | None = None,
              fixed: _ReadFit | None = None) -> _ReadFit:
    K, S, lnx, g2, tb = _read_bins(rd, w)
    x_lo = float(np.exp(lnx.min()))
    if not S.sum() > 0:  # repeats agree exactly (noise below the instrument resolution)
        return _ReadFit(relative=True, kind="const", law="none", a=0.0, b=0.0, aic={}, x_lo=x_lo)
    cands = [(rel, kind, law) for law in ("none", "log1f") for rel, kind in
             ((True, "const"), (False, "const"), (True, "power"))]
    if fixed is not None:
        cands = [(fixed.relative, fixed.kind, fixed.law)]
    best: _ReadFit | None = None
    best_aic = math.inf
    aics: dict[str, float] = {}
    for rel, kind, law in cands:
        if kind == "const":
            b = 0.0
        else:
            r = optimize.minimize_scalar(lambda bb, rel=rel, law=law: _read_profile(K, S, lnx, g2, tb, rel, bb, law,
                                                                                    cfg)[1],
                                         bounds=(-3.0, 3.0), method="bounded", options={"xatol": 1e-5})
            b = float(r.x)
        a, nll = _read_profile(K, S, lnx, g2, tb, rel, b, law, cfg)
        aic = 2 * nll + 2 * (1 if kind == "const" else 2)
        key = f"{'relative' if rel else 'absolute'}-{kind}-{law}"
        aics[key] = aic
        if aic < best_aic:
            best_aic = aic
            best = _ReadFit(relative=rel, kind=kind, law=law, a=a, b=b, aic={}, x_lo=x_lo)
    assert best is not None
    best.aic = aics
    return best


# ---------------------------------------------------------------------------------------------
# stage 4: drift


@dataclass
class _DriftData:
    cell: np.ndarray  # cells with a drift estimate
    nu: np.ndarray
    e2: np.ndarray  # measurement variance of nu from read noise
    lnx: np.ndarray  # ln(g_prog / g_max) estimate
    bin: np.ndarray
    n_bins: int


@dataclass
class _DriftFit:
    mean_kind: str
    mean_c: tuple[float, ...]
    std_kind: str
    std_c: tuple[float, ...]
    lnx_range: tuple[float, float]
    diag: dict[str, Any]

    def curve_mean(self) -> Curve:
        return _loglin_curve(self.mean_kind, self.mean_c, self.lnx_range, lo0=0.0)

    def curve_std(self) -> Curve:
        return _loglin_curve(self.std_kind, self.std_c, self.lnx_range, lo0=0.0)


def _loglin_curve(kind: str, c: tuple[float, ...], lnx_range: tuple[float, float], lo0: float) -> Curve:
    """Loglin with clips at the values reached at the ends of the observed range (no extrapolation)."""
    if kind == "const":
        return Curve("const", (max(c[0], lo0) + 0.0,))
    if kind == "loglin_clip":
        lo, hi = sorted(c[2:4])
        return Curve("loglin", c[:2], lo=max(lo, lo0), hi=max(hi, lo0))
    ends = [c[0] + c[1] * v for v in lnx_range]
    return Curve("loglin", c, lo=max(min(ends), lo0), hi=max(max(ends), lo0))


def _drift_data(d: Dump, c: _Cells, healthy: np.ndarray, read: _ReadFit | None, cfg: FitConfig,
                rng: np.random.Generator) -> _DriftData | None:
    L = np.log((d.t + cfg.t0) / cfg.t0)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.log(c.mean)
    valid = np.isfinite(y) & (c.mean > 0) & healthy[None, :]
    npts = valid.sum(axis=0)
    use = npts >= cfg.min_drift_times
    if use.sum() < 10:
        return None
    v = valid[:, use]
    yy = np.where(v, y[:, use], 0.0)
    Lm = np.where(v, L, 0.0)
    n = v.sum(axis=0)
    Lbar = Lm.sum(axis=0) / n
    ybar = yy.sum(axis=0) / n
    dL = np.where(v, L - Lbar, 0.0)
    sxx = (dL * dL).sum(axis=0)
    ok = sxx > 1e-12
    nu = -(dL * (yy - ybar)).sum(axis=0) / np.where(ok, sxx, 1.0)
    if read is not None:
        gm = np.where(v, c.mean[:, use], 1.0)
        sr = read.sigma(gm, d.t[:, None], d.g_max, cfg.t0, cfg.t_read)
        vy = np.where(v, (sr / gm) ** 2 / np.maximum(c.cnt[:, use], 1), 0.0)
        e2 = (dL * dL * vy).sum(axis=0) / np.where(ok, sxx, 1.0) ** 2
    else:
        e2 = np.zeros_like(nu)
    lnx = ybar + nu * Lbar - math.log(d.g_max)
    cells = np.flatnonzero(use)[ok]
    nu, e2, lnx = nu[ok], e2[ok], lnx[ok]
    edges = _quantile_edges(lnx, cfg.n_bins, rng)
    b = np.clip(np.searchsorted(edges, lnx, side="right") - 1, 0, edges.size - 2)
    return _DriftData(cell=cells, nu=nu, e2=e2, lnx=lnx, bin=b, n_bins=edges.size - 1)


def _drift_bins(dd: _DriftData, w: np.ndarray | None, keep: np.ndarray) -> tuple[np.ndarray, ...]:
    ww = keep.astype(np.float64) if w is None else w[dd.cell] * keep
    nb = dd.n_bins
    n = _wbincount(dd.bin, ww, nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = _wbincount(dd.bin, ww * dd.nu, nb) / n
        v = _wbincount(dd.bin, ww * dd.nu ** 2, nb) / n - m ** 2
        v = v * n / np.maximum(n - 1, 1)
        e2 = _wbincount(dd.bin, ww * dd.e2, nb) / n
        lx = _wbincount(dd.bin, ww * dd.lnx, nb) / n
    ok = n >= 3
    return n[ok], m[ok], np.maximum(v[ok], 0.0), e2[ok], lx[ok]


def _wls_loglin(lx: np.ndarray, y: np.ndarray, wt: np.ndarray, kind: str,
                start: tuple[float, ...] | None = None) -> tuple[tuple[float, ...], float]:
    """Weighted least squares of y on 1, (1, ln x), or clip(c0 + c1 ln x, lo, hi); coefficients, chi-square."""
    if kind == "loglin_clip":
        if start is None:
            c, _ = _wls_loglin(lx, y, wt, "loglin")
            ends = sorted(c[0] + c[1] * v for v in (lx.min(), lx.max()))
            start = (c[0], c[1], ends[0], ends[1])
        sw = np.sqrt(wt)

        def res(p: np.ndarray) -> np.ndarray:
            lo, hi = min(p[2], p[3]), max(p[2], p[3])
            return sw * (np.clip(p[0] + p[1] * lx, lo, hi) - y)

        best = None
        for st in (np.asarray(start), np.asarray(start) * [1, 1.5, 1, 1], np.asarray(start) * [1, 0.5, 1, 1]):
            r = optimize.least_squares(res, st, method="trf", x_scale="jac")
            if best is None or r.cost < best.cost:
                best = r
        assert best is not None
        return tuple(float(v) for v in best.x), float(2 * best.cost)
    A = np.ones((y.size, 1)) if kind == "const" else np.column_stack([np.ones_like(lx), lx])
    sw = np.sqrt(wt)
    coef, *_ = np.linalg.lstsq(A * sw[:, None], y * sw, rcond=None)
    chi2 = float(np.sum(wt * (y - A @ coef) ** 2))
    return tuple(float(v) for v in coef), chi2


def _fit_drift(dd: _DriftData, cfg: FitConfig, w: np.ndarray | None = None,
               fixed: _DriftFit | None = None) -> tuple[_DriftFit, np.ndarray]:
    keep = np.ones(dd.nu.size, dtype=bool)
    for _ in range(2):  # one pass of 5-sigma clipping per bin (robustness to leftover outliers)
        n, m, v, e2, lx = _drift_bins(dd, w, keep)
        if w is not None:
            break
        s_all = np.sqrt(np.maximum(v, 1e-12))
        mb = np.zeros(dd.n_bins)
        sb = np.full(dd.n_bins, np.inf)
        nfull = _wbincount(dd.bin, None, dd.n_bins)
        okb = nfull >= 3
        mb[okb], sb[okb] = m, s_all
        keep = np.abs(dd.nu - mb[dd.bin]) <= 5 * sb[dd.bin] + 1e-12
    s2 = np.maximum(v - e2, 0.0)
    se_m2 = np.maximum(v, 1e-12) / n
    kinds = ("const", "loglin", "loglin_clip") if fixed is None else (fixed.mean_kind,)
    st_m = fixed.mean_c if fixed is not None and fixed.mean_kind == "loglin_clip" else None
    res_m = {k: _wls_loglin(lx, m, 1.0 / se_m2, k, st_m) for k in kinds}
    mk = min(res_m, key=lambda k: res_m[k][1] + 2 * len(res_m[k][0]))
    # std: regress the noise-corrected std; SE(s) from the sampling variance of a variance.
    s = np.sqrt(s2)
    se_s = np.maximum(v, 1e-12) * np.sqrt(2.0 / np.maximum(n - 1, 1)) / (2 * np.maximum(s, np.sqrt(v) * 0.1 + 1e-6))
    kinds_s = ("const", "loglin", "loglin_clip") if fixed is None else (fixed.std_kind,)
    st_s = fixed.std_c if fixed is not None and fixed.std_kind == "loglin_clip" else None
    res_s = {k: _wls_loglin(lx, s, 1.0 / se_s ** 2, k, st_s) for k in kinds_s}
    sk = min(res_s, key=lambda k: res_s[k][1] + 2 * len(res_s[k][0]))
    rng_lx = (float(np.quantile(dd.lnx, 0.005)), float(np.quantile(dd.lnx, 0.995))) if fixed is None \
        else fixed.lnx_range
    diag = {"aic_mean": {k: r[1] + 2 * len(r[0]) for k, r in res_m.items()},
            "aic_std": {k: r[1] + 2 * len(r[0]) for k, r in res_s.items()},
            "n_cells": int(keep.sum()), "n_clipped": int((~keep).sum()),
            "median_measurement_std": float(np.sqrt(np.median(dd.e2)))}
    return _DriftFit(mk, res_m[mk][0], sk, res_s[sk][0], rng_lx, diag), keep


# ---------------------------------------------------------------------------------------------
# stage 5: programming noise


@dataclass
class _ProgData:
    cell: np.ndarray
    r: np.ndarray  # back-corrected first read minus target (µS)
    e: np.ndarray  # variance from read noise and drift spread (µS^2)
    x: np.ndarray  # target / g_max
    cens: np.ndarray  # read at the 0 µS floor
    bin: np.ndarray
    n_bins: int
    p_res: np.ndarray  # probability that the cell is an unclassified stuck-low cell (mixture weight)


def _prog_data(d: Dump, c: _Cells, healthy: np.ndarray, read: _ReadFit | None, drift: _DriftFit | None,
               cfg: FitConfig, st: _Stuck | None = None, p_low: float = 0.0) -> _ProgData:
    cells = np.flatnonzero(healthy & (c.first >= 0))
    fi = c.first[cells]
    m1 = c.mean[fi, cells]
    t1 = d.t[fi]
    x = d.g_target[cells] / d.g_max
    L1 = np.log((t1 + cfg.t0) / cfg.t0)
    if drift is not None:
        nu_m = drift.curve_mean()(x)
        nu_s = drift.curve_std()(x)
    else:
        nu_m = nu_s = np.zeros_like(x)
    D = np.exp(nu_m * L1)
    g_hat = m1 * D
    e = (nu_s * L1 * g_hat) ** 2
    if read is not None:
        e = e + (read.sigma(m1, t1, d.g_max, cfg.t0, cfg.t_read) * D) ** 2 / c.cnt[fi, cells]
    cens = (m1 <= 1e-4 * d.g_max) if cfg.mapping != "direct" else np.zeros(cells.size, bool)
    nb = cfg.n_bins
    b = np.clip((x * nb).astype(np.int64), 0, nb - 1)
    p_res = p_low * (~st.elig_low[cells]) if st is not None else np.zeros(cells.size)
    return _ProgData(cell=cells, r=g_hat - d.g_target[cells], e=e, x=x, cens=cens, bin=b, n_bins=nb,
                     p_res=p_res.astype(np.float64))


@dataclass
class _ProgBins:
    n_u: np.ndarray
    s2: np.ndarray  # sum r^2 over uncensored
    s1: np.ndarray
    e: np.ndarray  # mean extra variance
    n_c: np.ndarray
    tgt: np.ndarray  # mean target (µS)
    x: np.ndarray
    pc: np.ndarray  # mean unclassified stuck-low probability


def _prog_bins(p: _ProgData, w: np.ndarray | None, keep: np.ndarray, g_max: float) -> _ProgBins:
    ww = keep.astype(np.float64) if w is None else w[p.cell] * keep
    wu = ww * ~p.cens
    nb = p.n_bins
    n_all = _wbincount(p.bin, ww, nb)
    n_u = _wbincount(p.bin, wu, nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        e = _wbincount(p.bin, wu * p.e, nb) / n_u
        x = _wbincount(p.bin, ww * p.x, nb) / n_all
        pc = _wbincount(p.bin, ww * p.p_res, nb) / n_all
    ok = n_all >= 3
    return _ProgBins(n_u=n_u[ok], s2=_wbincount(p.bin, wu * p.r ** 2, nb)[ok], s1=_wbincount(p.bin, wu * p.r, nb)[ok],
                     e=np.nan_to_num(e[ok]), n_c=(n_all - n_u)[ok], tgt=x[ok] * g_max, x=x[ok], pc=pc[ok])


def _prog_nll(sig_p: np.ndarray, pb: _ProgBins) -> float:
    """Binned censored Gaussian negative log-likelihood (zero-mean errors, floor at 0 µS).

    A cell at the floor is either a healthy cell programmed below 0 or a stuck-low cell that the
    stuck stage could not tell apart (mixture weight pc)."""
    v = np.maximum(sig_p, 1e-9) ** 2 + pb.e
    nll = 0.5 * np.sum(pb.n_u * np.log(v) + pb.s2 / v)
    if pb.n_c.any():
        nll -= np.sum(pb.n_c * np.log(pb.pc + (1 - pb.pc) * special.ndtr(-pb.tgt / np.sqrt(v)) + 1e-300))
    return float(nll)


def _per_bin_sigma(pb: _ProgBins) -> np.ndarray:
    """Non-parametric sigma_prog per bin (1-D censored ML where cells sit at the floor)."""
    out = np.sqrt(np.maximum(pb.s2 / np.maximum(pb.n_u, 1) - pb.e, 0.0))
    for i in np.flatnonzero(pb.n_c > 0):
        one = _ProgBins(pb.n_u[i:i + 1], pb.s2[i:i + 1], pb.s1[i:i + 1], pb.e[i:i + 1], pb.n_c[i:i + 1],
                        pb.tgt[i:i + 1], pb.x[i:i + 1], pb.pc[i:i + 1])
        hi = max(10 * math.sqrt(pb.s2[i] / max(pb.n_u[i], 1) + 1e-12), pb.tgt[i] * 10 + 1e-6)
        r = optimize.minimize_scalar(lambda s, one=one: _prog_nll(np.array([s]), one), bounds=(1e-9, hi),
                                     method="bounded")
        out[i] = float(r.x)
    return out


def _fit_poly(pb: _ProgBins, deg: int, start: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    sig_b = _per_bin_sigma(pb) if start is None else None
    if start is None:
        wt = np.sqrt(np.maximum(pb.n_u + pb.n_c, 1))
        start = np.polynomial.polynomial.polyfit(pb.x, sig_b, deg, w=wt)

    def f(c: np.ndarray) -> float:
        return _prog_nll(np.polynomial.polynomial.polyval(pb.x, c), pb)

    scale = np.maximum(np.abs(start), 1e-3)
    r = optimize.minimize(lambda z: f(z * scale), start / scale, method="BFGS", options={"gtol": 1e-6})
    c = r.x * scale
    return c, f(c)


def _fit_prog(p: _ProgData, cfg: FitConfig, g_max: float, w: np.ndarray | None = None,
              fixed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    keep = np.ones(p.r.size, dtype=bool)
    if w is None:  # one pass of 8-sigma clipping per bin
        pb = _prog_bins(p, None, keep, g_max)
        sb = _per_bin_sigma(pb) + np.sqrt(pb.e)
        full = np.full(p.n_bins, np.inf)
        okb = _wbincount(p.bin, None, p.n_bins) >= 3
        full[okb] = np.maximum(sb, 1e-6 * g_max)
        keep = np.abs(p.r) <= 8 * full[p.bin]
    pb = _prog_bins(p, w, keep, g_max)
    if fixed is not None:
        c, _ = _fit_poly(pb, fixed.size - 1, start=fixed)
        return c, keep, {}
    n = float(pb.n_u.sum() + pb.n_c.sum())
    crit: dict[int, float] = {}
    fits: dict[int, np.ndarray] = {}
    for deg in range(0, min(cfg.max_prog_degree, max(pb.x.size - 2, 0)) + 1):
        c, nll = _fit_poly(pb, deg)
        pen = (deg + 1) * (math.log(n) if cfg.criterion == "bic" else 2.0)
        crit[deg] = 2 * nll + pen
        fits[deg] = c
    best = min(crit, key=crit.get)  # type: ignore[arg-type]
    diag = {f"{cfg.criterion}_by_degree": {str(k): v for k, v in crit.items()}, "degree": best,
            "n_cells": int(keep.sum()), "n_clipped": int((~keep).sum()), "n_censored": int((p.cens & keep).sum()),
            "bias_by_bin_uS": (pb.s1 / np.maximum(pb.n_u, 1)).tolist()}
    return fits[best], keep, diag


# ---------------------------------------------------------------------------------------------
# orchestration


def fit_dump(path: str | Path, config: FitConfig | None = None) -> FitResult:
    """Read, validate and fit a dump; raises `DumpError` on unusable input."""
    cfg = config or FitConfig()
    d = read_dump(path, min_cells=cfg.min_cells, neg_tol=cfg.neg_tol)
    return fit_data(d, cfg)


def fit_data(d: Dump, cfg: FitConfig | None = None) -> FitResult:
    """Fit an already-loaded `Dump` (see module docstring for the stages)."""
    import time

    cfg = cfg or FitConfig()
    t_start = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    warns = list(d.warnings)
    g_max = d.g_max
    c = _reduce(d.g)

    st = _stuck(d, c, cfg, rng)
    healthy = ~(st.low | st.high)
    p_low, p_high = _stuck_rates(st, None)
    n_healthy = int((healthy & (c.first >= 0)).sum())
    if n_healthy < cfg.min_cells:
        raise DumpError(f"{d.path}: too few cells: {n_healthy} healthy measured cell(s) after removing stuck "
                        f"ones, need >= {cfg.min_cells}")

    rd = _read_data(d, c, healthy, cfg, rng)
    read = _fit_read(rd, cfg) if rd is not None else None
    if read is None:
        warns.append("read noise not fitted: needs >= 2 repeats per time on >= 10 cells; read_sigma = 0")

    n_times = int((c.cnt.sum(axis=1) > 0).sum())
    dd = None
    if n_times >= cfg.min_drift_times:
        dd = _drift_data(d, c, healthy, read, cfg, rng)
    drift: _DriftFit | None = None
    nu_keep = None
    if dd is None:
        warns.append(f"drift not fitted: {n_times} read time(s) with data, need >= {cfg.min_drift_times} "
                        "(and >= 10 cells with positive reads); nu = 0")
    else:
        drift, nu_keep = _fit_drift(dd, cfg)

    pd_ = _prog_data(d, c, healthy, read, drift, cfg, st, p_low)
    prog_c, prog_keep, prog_diag = _fit_prog(pd_, cfg, g_max)

    # ---- bootstrap: Poisson per-cell weights, model forms fixed ---------------------------------
    boot: dict[str, list[float]] = {}

    def put(k: str, v: float) -> None:
        boot.setdefault(k, []).append(float(v))

    grid = np.asarray(_GRID)
    brng = np.random.default_rng([cfg.seed, 1])
    n = d.g_target.size
    for _ in range(cfg.n_boot):
        w = brng.poisson(1.0, n).astype(np.float64)
        pl, ph = _stuck_rates(st, w)
        put("p_stuck_low", pl)
        put("p_stuck_high", ph)
        if read is not None and rd is not None:
            rb = _fit_read(rd, cfg, w, fixed=read)
            put("read.a", rb.a)
            if rb.kind == "power":
                put("read.b", rb.b)
        if drift is not None and dd is not None:
            db, _ = _fit_drift(dd, cfg, w * _mask(n, dd.cell[nu_keep]), fixed=drift)
            for i, v in enumerate(db.mean_c):
                put(f"nu_mean.c{i}", v)
            for i, v in enumerate(db.std_c):
                put(f"nu_std.c{i}", v)
            for xg, v in zip(grid, db.curve_mean()(grid), strict=True):
                put(f"nu_mean@x={xg:g}", v)
        cb, _, _ = _fit_prog(pd_, cfg, g_max, w * _mask(n, pd_.cell[prog_keep]), fixed=prog_c)
        for i, v in enumerate(cb):
            put(f"prog.c{i}", v)
        for xg, v in zip(grid, np.maximum(np.polynomial.polynomial.polyval(grid, cb), 0), strict=True):
            put(f"sigma_prog@x={xg:g}", v)

    # ---- assemble the model -------------------------------------------------------------------
    prog_curve = Curve("poly", tuple(float(v) for v in prog_c), lo=0.0)
    kw: dict[str, Any] = {}
    if read is not None:
        kw["read_sigma"] = (Curve("const", (read.a,)) if read.kind == "const" else
                            Curve("power", (read.a, read.b), lo=0.0,
                                  hi=float(read.a * read.x_lo ** read.b) if read.b < 0 else None))
        kw["read_relative"] = read.relative
        kw["read_time_law"] = read.law
    if drift is not None:
        kw["nu_mean"] = drift.curve_mean()
        kw["nu_std"] = drift.curve_std()
    gof: dict[str, Any] = {}
    krng = np.random.default_rng([cfg.seed, 2])
    sp = np.maximum(np.polynomial.polynomial.polyval(pd_.x, prog_c), 0)
    tot = np.sqrt(sp ** 2 + pd_.e)
    sel = prog_keep & ~pd_.cens & (pd_.x * g_max > 4 * tot)
    gof["prog"] = _ks_normal(pd_.r[sel] / tot[sel], krng, cfg.ks_max_samples)
    if drift is not None and dd is not None:
        x_nu = np.exp(dd.lnx)
        sd = np.sqrt(drift.curve_std()(x_nu) ** 2 + dd.e2)
        gof["drift"] = _ks_normal((dd.nu - drift.curve_mean()(x_nu)) / np.maximum(sd, 1e-12), krng,
                                  cfg.ks_max_samples)
    if read is not None and rd is not None and read.a > 0:
        g_item = np.sqrt(rd.g2)
        s_mod = read.sigma(g_item, rd.t, g_max, cfg.t0, cfg.t_read)
        u = stats.chi2.cdf(rd.ks2 / np.maximum(s_mod ** 2, 1e-300), rd.k)
        gof["read"] = _ks_uniform(u, krng, cfg.ks_max_samples)
        gof["read"]["test"] = "KS of chi2 CDF of (R-1) s^2 / sigma^2 against U(0,1)"
    gof["prog"]["test"] = "KS of standardized first-read residuals against N(0,1) (uncensored region)"
    if "drift" in gof:
        gof["drift"]["test"] = "KS of standardized per-cell nu against N(0,1)"

    ci = {k: _ci(v) for k, v in boot.items()}
    diagnostics: dict[str, Any] = {
        "n_cells": int(n), "shape_TRN": list(d.g.shape), "times_s": d.t.tolist(),
        "stuck": {**st.diag, "p_stuck_low": p_low, "p_stuck_high": p_high,
                  "n_eligible_low": int(st.elig_low.sum()), "n_eligible_high": int(st.elig_high.sum())},
        "read_noise": ({"model": f"{'relative' if read.relative else 'absolute'}-{read.kind}-{read.law}",
                        "a": read.a, "b": read.b, "aic": read.aic} if read is not None else {"fitted": False}),
        "drift": ({"fitted": True, "mean_kind": drift.mean_kind, "std_kind": drift.std_kind, **drift.diag}
                  if drift is not None else {"fitted": False, "reason": "too few read times"}),
        "prog": prog_diag,
        "goodness_of_fit": gof,
        "bootstrap": {"n_boot": cfg.n_boot, "seed": cfg.seed, "method": "Poisson per-cell weights, forms fixed",
                      "ci95": ci},
        "warnings": warns,
    }
    if drift is None:
        diagnostics["drift"]["left_out"] = True
    elapsed = time.perf_counter() - t_start
    diagnostics["fit_seconds"] = elapsed
    idn = str(d.attrs.get("device_idn", "unknown"))
    model = NoiseModel(
        name=cfg.name or f"fit:{idn}",
        g_min=d.g_min,
        g_max=g_max,
        prog_sigma=prog_curve,
        t0=cfg.t0,
        t_read=cfg.t_read,
        p_stuck_low=p_low,
        p_stuck_high=p_high,
        g_stuck_low=st.g_low,
        g_stuck_high=st.g_high,
        mapping=cfg.mapping,
        provenance={"source": "fit", "dump": str(d.path), "device_idn": idn,
                    "dump_schema_version": d.attrs.get("schema_version"),
                    "dump_software_version": d.attrs.get("software_version"),
                    "dump_created": d.attrs.get("created"),
                    "fitted_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                    "fit_config": asdict(cfg)},
        diagnostics=diagnostics,
        **kw,
    )
    arrays = _report_arrays(d, st, pd_, prog_keep, dd, rd, cfg, krng)
    return FitResult(model=model, warnings=warns, arrays=arrays, seconds=elapsed)


def _mask(n: int, idx: np.ndarray) -> np.ndarray:
    m = np.zeros(n)
    m[idx] = 1.0
    return m


def _report_arrays(d: Dump, st: _Stuck, p: _ProgData, keep: np.ndarray, dd: _DriftData | None,
                   rd: _ReadData | None, cfg: FitConfig, rng: np.random.Generator) -> FitArrays:
    a = FitArrays(g_max=d.g_max)
    pb = _prog_bins(p, None, keep, d.g_max)
    a.prog_x, a.prog_sigma, a.prog_n = pb.x, _per_bin_sigma(pb), pb.n_u + pb.n_c
    if dd is not None:
        k = min(dd.nu.size, 50_000)
        i = rng.choice(dd.nu.size, k, replace=False)
        a.nu_x, a.nu = np.exp(dd.lnx[i]), dd.nu[i]
    if rd is not None:
        K, S, lnx, g2, tb = _read_bins(rd, None)
        a.read_g, a.read_sigma, a.read_t = np.sqrt(g2), np.sqrt(S / K), tb
    s = st.low | st.high
    a.stuck_tile, a.stuck_row, a.stuck_col = d.tile[s], d.row[s], d.col[s]
    a.stuck_code = np.where(st.low[s], 1, 2).astype(np.int8)
    a.n_tiles = int(d.tile.max()) + 1 if d.tile.size else 1
    return a
