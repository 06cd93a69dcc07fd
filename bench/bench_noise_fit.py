"""Benchmark: noise fit time vs measurement count, and NoiseModel sampling throughput.

Run: ``python -m bench.bench_noise_fit [--quick]``. Prints a table; nothing is written.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from noise_fit.fit import FitConfig, fit_data
from noise_fit.io import Dump
from noise_fit.presets import resolve
from tests.dumpgen import sample_reads

TIMES = (1.0, 60.0, 3600.0, 86400.0)
REPEATS = 3


def _dump(n_meas: int, seed: int) -> Dump:
    m = replace(resolve("pcm"), p_stuck_low=0.01, p_stuck_high=0.005)
    n = n_meas // (len(TIMES) * REPEATS)
    s = sample_reads(m, n, TIMES, REPEATS, np.random.default_rng(seed))
    idx = np.arange(n, dtype=np.int32)
    return Dump(path=f"<synthetic {n_meas:.0e}>", g_target=s["g_target"].astype(np.float64), t=np.asarray(TIMES),
                g=s["g"], tile=idx // 4096, row=(idx % 4096) // 64, col=idx % 64,
                stuck_flags=np.full(n, -1, np.int8), g_max=m.g_max)


def bench_fit(n_meas: int, n_boot: int = 50) -> float:
    d = _dump(n_meas, seed=0)
    t = time.perf_counter()
    fit_data(d, FitConfig(n_boot=n_boot))
    return time.perf_counter() - t


def bench_sample(n: int) -> float:
    """values/s of NoiseModel.sample (target -> programmed -> read at t) on float32."""
    m = replace(resolve("pcm"), p_stuck_low=0.01)
    g = np.random.default_rng(0).uniform(0, m.g_max, n).astype(np.float32)
    rng = np.random.default_rng(1)
    m.sample(g[:1000], 3600.0, rng)
    t = time.perf_counter()
    m.sample(g, 3600.0, rng)
    return n / (time.perf_counter() - t)


def bench_naive(n: int = 20_000) -> float:
    """values/s of a per-element Python loop doing the same maths (extrapolated from small n)."""
    m = resolve("pcm")
    rng = np.random.default_rng(2)
    g = rng.uniform(0, m.g_max, n).tolist()
    out = [0.0] * n
    c = m.prog_sigma.coeffs
    t0, law = m.t0, m.read_time_factor(3600.0)
    t = time.perf_counter()
    for i, gt in enumerate(g):
        x = gt / m.g_max
        sp = max(c[0] + c[1] * x + c[2] * x * x, 0.0)
        gp = max(gt + sp * rng.standard_normal(), 0.0)
        nu = abs(float(m.nu_mean(np.array(x))) + float(m.nu_std(np.array(x))) * rng.standard_normal())
        gd = gp * ((3600.0 + t0) / t0) ** -nu
        xr = max(gd / m.g_max, 1e-6)
        sr = min(0.0088 * xr ** -0.65, 0.2) * law * gd
        out[i] = max(gd + sr * rng.standard_normal(), 0.0)
    return n / (time.perf_counter() - t)


def bench_copy(n: int) -> float:
    """values/s of a plain float32 copy: the memory-bandwidth bound for an elementwise op."""
    a = np.ones(n, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    t = time.perf_counter()
    for _ in range(3):
        np.copyto(b, a)
    return 3 * n / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="1e5/1e6 measurements instead of 1e6/1e7")
    ap.add_argument("--n-boot", type=int, default=50)
    a = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    sizes = (10**5, 10**6) if a.quick else (10**6, 10**7)
    res: dict[str, float] = {}
    for n in sizes:
        res[f"fit_s@{n:.0e}"] = bench_fit(n, a.n_boot)
    ns = 10**6 if a.quick else 10**7
    res["sample_values_per_s"] = bench_sample(ns)
    res["naive_loop_values_per_s"] = bench_naive()
    res["memcopy_values_per_s"] = bench_copy(ns)
    t = Table(title=f"noise_fit benchmark (T={len(TIMES)}, R={REPEATS}, n_boot={a.n_boot})")
    t.add_column("measure")
    t.add_column("value", justify="right")
    for k, v in res.items():
        t.add_row(k, f"{v:.3g}")
    t.add_row("time for 1e9 values via sample (s)", f"{1e9 / res['sample_values_per_s']:.3g}")
    t.add_row("sample / naive speed-up", f"{res['sample_values_per_s'] / res['naive_loop_values_per_s']:.3g}")
    t.add_row("sample / memcopy", f"{res['sample_values_per_s'] / res['memcopy_values_per_s']:.3g}")
    Console().print(t)
    return res


if __name__ == "__main__":
    main()
