"""Fast, chunked, multithreaded sampling kernels behind `NoiseModel.sample` and friends.

Why a separate module: `model.py` keeps the readable definition of the model; this file is
the same maths written for throughput (numpy only, no torch):

- the array is cut into chunks of ``chunk`` elements (default 65 536: every scratch buffer
  of one chunk fits in a 1 MiB L2 together) and every pass of a chunk runs in place
  (``out=``) in the caller's dtype (float32 stays float32), with no temporaries;
- chunk ``i`` draws from its own generator, ``PCG64(SeedSequence(entropy, spawn_key=(i,)))``,
  where ``entropy`` (128 bits) is drawn from the caller's generator once per call. Results
  are therefore a deterministic function of the caller's generator state and ``chunk``, and
  do NOT depend on the number of worker threads (numpy ufuncs and Generator methods release
  the GIL, so chunks run in parallel);
- standard normals use the Box-Muller transform in its exact form: radius sqrt(2 E) with
  E ~ Exp(1) from numpy's exponential ziggurat, angle 2 pi U with U ~ U[0, 1). Both outputs
  of a pair are used. This is exactly N(0, 1) (no truncated tail, unlike Box-Muller on
  float uniforms) and about 2x faster than ``Generator.standard_normal`` in float32;
- stuck cells are drawn sparsely when rare (count ~ Binomial(n, p_low + p_high), positions a
  uniform random subset, each low with probability p_low / (p_low + p_high)): the same
  i.i.d. per-cell law as one uniform per cell, without touching every cell;
- parts with zero coefficients are skipped (no read noise, no drift, t = 0, no stuck cells);
- the drift factor ((t + t0) / t0) ** -nu is exp(-nu * L) with the scalar L = ln((t + t0) / t0),
  ``power`` curves are exp(c1 * ln x): one transcendental per element instead of a pow.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from noise_fit.model import Curve, NoiseModel

DEFAULT_CHUNK = 1 << 16
MAX_DEFAULT_WORKERS = 4
_SPARSE_STUCK_MAX_P = 0.01  # above this stuck cells are drawn with one uniform per cell
_X_FLOOR = 1e-6  # same floor as model._X_FLOOR (ln and negative powers of g / g_max)
_TWO_PI = 2.0 * math.pi


def default_workers() -> int:
    """min(4, CPUs this process may run on)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, n))


def work_dtype(a: np.ndarray) -> np.dtype:
    """float32 and float64 are kept; everything else is computed in float64."""
    return a.dtype if a.dtype in (np.float32, np.float64) else np.dtype(np.float64)


def curve_is_zero(c: Curve, floor_at_zero: bool) -> bool:
    """True when the curve is 0 everywhere (or <= 0 everywhere and the caller clips at 0)."""
    k, co = c.kind, c.coeffs
    if k == "const" or (k == "loglin" and co[1] == 0.0) or (k == "poly" and not any(co[1:])):
        v: float | None = co[0]
    elif k == "power" and co[0] == 0.0:
        v = 0.0
    else:
        v = None
    if v is not None:
        if c.lo is not None:
            v = max(v, c.lo)
        if c.hi is not None:
            v = min(v, c.hi)
        return v == 0.0 or (floor_at_zero and v < 0.0)
    return floor_at_zero and c.hi is not None and c.hi <= 0.0


class _Buffers:
    """Per-worker scratch, allocated once per call and reused for every chunk."""

    def __init__(self, chunk: int, dtype: np.dtype) -> None:
        self.x = np.empty(chunk, dtype)
        self.y = np.empty(chunk, dtype)
        self.s = np.empty(chunk, dtype)
        self.lx = np.empty(chunk, dtype)
        self.z = np.empty(chunk, dtype)
        self.bm = np.empty(chunk + 2, dtype)
        self.mask = np.empty(chunk, bool)
        self.f64 = np.empty(chunk, np.float64)


def normals(gen: np.random.Generator, out: np.ndarray, bm: np.ndarray) -> None:
    """Fill ``out`` with i.i.d. N(0, 1) by exact Box-Muller (``bm``: scratch of >= len(out) + 1)."""
    n = out.size
    h = (n + 1) // 2
    r = bm[:h]
    a = bm[h:2 * h]
    gen.standard_exponential(dtype=out.dtype, out=r)
    np.multiply(r, 2.0, out=r)
    np.sqrt(r, out=r)
    gen.random(dtype=out.dtype, out=a)
    np.multiply(a, _TWO_PI, out=a)
    lo, hi = out[:h], out[h:]
    np.sin(a, out=lo)
    np.multiply(lo, r, out=lo)
    np.cos(a[:n - h], out=hi)
    np.multiply(hi, r[:n - h], out=hi)


def curve_into(c: Curve, x: np.ndarray, out: np.ndarray, tmp: np.ndarray,
               logx: Callable[[], np.ndarray]) -> np.ndarray:
    """``out[:] = c(x)`` in x's dtype, in place; ``logx()`` gives ln(max(x, 1e-6)) (computed once)."""
    co = c.coeffs
    k = c.kind
    if k == "const":
        out.fill(co[0])
    elif k == "poly":
        _horner(co, x, out)
    elif k == "loglin":
        np.multiply(logx(), co[1], out=out)
        np.add(out, co[0], out=out)
    elif k == "power":
        np.multiply(logx(), co[1], out=out)
        np.exp(out, out=out)
        np.multiply(out, co[0], out=out)
    else:  # split
        np.multiply(logx(), co[2], out=tmp)
        np.add(tmp, co[1], out=tmp)
        np.clip(tmp, co[3], co[4], out=tmp)
        _horner(co[5:], x, out)
        mask = np.less(x, co[0])
        np.putmask(out, mask, tmp)
    if c.lo is not None or c.hi is not None:
        np.clip(out, c.lo, c.hi, out=out)
    return out


def _nonneg(c: Curve) -> bool:
    """The curve's own clip already keeps it >= 0 (so max(., 0) can be skipped)."""
    return c.lo is not None and c.lo >= 0.0


def _horner(co: tuple[float, ...], x: np.ndarray, out: np.ndarray) -> None:
    if len(co) == 1:
        out.fill(co[0])
        return
    np.multiply(x, co[-1], out=out)
    np.add(out, co[-2], out=out)
    for ci in reversed(co[:-2]):
        np.multiply(out, x, out=out)
        np.add(out, ci, out=out)


def stuck_positions(n: int, gen: np.random.Generator, p_low: float, p_high: float,
                    f64: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of stuck-low and stuck-high cells among n, each cell independently."""
    p = p_low + p_high
    if n == 0 or p == 0.0:
        e = np.empty(0, np.intp)
        return e, e
    if p <= _SPARSE_STUCK_MAX_P:
        k = int(gen.binomial(n, p))
        idx = gen.choice(n, k, replace=False, shuffle=False) if k else np.empty(0, np.intp)
        low = gen.random(k) < (p_low / p)
        return idx[low], idx[~low]
    u = gen.random(out=f64[:n]) if f64 is not None else gen.random(n)
    cand = np.flatnonzero(u < p)
    low = u[cand] < p_low
    return cand[low], cand[~low]


@dataclass(frozen=True)
class Plan:
    """Everything a chunk kernel needs, as scalars, decided once per call."""

    model: NoiseModel
    t: float
    do_prog: bool
    do_drift: bool
    nu_random: bool
    do_read: bool
    read_factor: float  # read_scale * law(t)
    log_drift: float  # ln((t + t0) / t0)
    inv_gmax: float
    floor: bool

    @classmethod
    def make(cls, m: NoiseModel, t: float) -> Plan:
        rf = m.read_scale * m.read_time_factor(t) if m.read_scale > 0 else 0.0
        drift_zero = curve_is_zero(m.nu_mean, False) and curve_is_zero(m.nu_std, False)
        return cls(
            model=m, t=t,
            do_prog=m.prog_scale > 0 and not curve_is_zero(m.prog_sigma, True),
            do_drift=t > 0 and m.drift_scale > 0 and not drift_zero,
            nu_random=not curve_is_zero(m.nu_std, False),
            do_read=rf > 0 and not curve_is_zero(m.read_sigma, True),
            read_factor=rf, log_drift=math.log((t + m.t0) / m.t0), inv_gmax=1.0 / m.g_max,
            floor=m.mapping != "direct",
        )


def _logx(b: _Buffers, n: int, x: np.ndarray) -> Callable[[], np.ndarray]:
    done: list[np.ndarray] = []

    def get() -> np.ndarray:
        if not done:
            lx = b.lx[:n]
            np.maximum(x, _X_FLOOR, out=lx)
            np.log(lx, out=lx)
            done.append(lx)
        return done[0]
    return get


def prog_stage(p: Plan, gt: np.ndarray, g: np.ndarray, gen: np.random.Generator, b: _Buffers,
               idx_low: np.ndarray, idx_high: np.ndarray) -> None:
    """g = floor(gt + sigma_prog(|gt|) N(0,1)), then stuck cells set (``gt`` may alias ``g``)."""
    m, n = p.model, gt.size
    if p.do_prog:
        x, y, z = b.x[:n], b.y[:n], b.z[:n]
        np.abs(gt, out=x)
        np.multiply(x, p.inv_gmax, out=x)
        curve_into(m.prog_sigma, x, y, b.s[:n], _logx(b, n, x))
        if not _nonneg(m.prog_sigma):
            np.maximum(y, 0.0, out=y)
        if m.prog_scale != 1.0:
            np.multiply(y, m.prog_scale, out=y)
        normals(gen, z, b.bm)
        np.multiply(y, z, out=y)
        np.add(gt, y, out=g)
    elif g is not gt:
        np.copyto(g, gt)
    if p.floor:
        np.maximum(g, 0.0, out=g)
    if idx_low.size:
        g[idx_low] = m.g_stuck_low
    if idx_high.size:
        g[idx_high] = m.stuck_high_value


def drift_stage(p: Plan, g: np.ndarray, gen: np.random.Generator, b: _Buffers,
                nu: np.ndarray | None, held: np.ndarray) -> None:
    """g *= ((t + t0) / t0) ** -nu; nu drawn from nu(|g|) unless given; cells ``held`` keep g."""
    m, n = p.model, g.size
    y = b.y[:n]
    if nu is not None:
        np.multiply(nu, -p.log_drift, out=y)
    else:
        if not p.do_drift:
            return
        x, s, z = b.x[:n], b.s[:n], b.z[:n]
        np.abs(g, out=x)
        np.multiply(x, p.inv_gmax, out=x)
        logx = _logx(b, n, x)
        curve_into(m.nu_mean, x, y, s, logx)
        if p.nu_random:
            curve_into(m.nu_std, x, s, z, logx)
            normals(gen, z, b.bm)
            np.multiply(s, z, out=s)
            np.add(y, s, out=y)
        np.abs(y, out=y)
        np.multiply(y, -p.log_drift * m.drift_scale, out=y)
    np.exp(y, out=y)
    keep = g[held] if held.size else None
    np.multiply(g, y, out=g)
    if keep is not None:
        g[held] = keep


def read_stage(p: Plan, g: np.ndarray, gen: np.random.Generator, b: _Buffers) -> None:
    """g += read_scale law(t) read_sigma(|g|) (|g| if relative) N(0,1), then the floor."""
    m, n = p.model, g.size
    if p.do_read:
        x, y, s, z = b.x[:n], b.y[:n], b.s[:n], b.z[:n]
        np.abs(g, out=s)
        np.multiply(s, p.inv_gmax, out=x)
        curve_into(m.read_sigma, x, y, z, _logx(b, n, x))
        if not _nonneg(m.read_sigma):
            np.maximum(y, 0.0, out=y)
        np.multiply(y, p.read_factor, out=y)
        if m.read_relative:
            np.multiply(y, s, out=y)
        normals(gen, z, b.bm)
        np.multiply(y, z, out=y)
        np.add(g, y, out=g)
    if p.floor:
        np.maximum(g, 0.0, out=g)


ChunkFn = Callable[[int, int, np.random.Generator, _Buffers], None]


def run_chunks(n: int, rng: np.random.Generator, dtype: np.dtype, fn: ChunkFn,
               workers: int | None = None, chunk: int = DEFAULT_CHUNK) -> None:
    """Call ``fn(start, stop, gen_i, buffers)`` for every chunk i of [0, n), on worker threads.

    ``gen_i`` depends only on the caller's ``rng`` (128 bits drawn from it, once) and ``i``.
    """
    if chunk < 2:
        raise ValueError(f"chunk must be >= 2 elements, got {chunk}")
    w = default_workers() if workers is None else int(workers)
    if w < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    entropy = [int(v) for v in rng.integers(0, 2**32, size=4, dtype=np.uint64)]
    n_chunks = -(-n // chunk)
    w = min(w, n_chunks)

    def gen(i: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy, spawn_key=(i,))))

    def worker(first: int) -> None:
        b = _Buffers(min(chunk, n), dtype)
        for i in range(first, n_chunks, w):
            fn(i * chunk, min(n, (i + 1) * chunk), gen(i), b)

    if w <= 1:
        if n_chunks:
            worker(0)
        return
    with ThreadPoolExecutor(max_workers=w, thread_name_prefix="noise-sample") as ex:
        for f in [ex.submit(worker, k) for k in range(w)]:
            f.result()
