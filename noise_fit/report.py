"""Fit report: a 2x2 PNG (matplotlib, Agg) and a rich summary table, from a `FitResult`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.table import Table

from noise_fit.fit import FitResult


def summary_table(result: FitResult) -> Table:
    """One row per fitted quantity with its 95 % bootstrap interval where available."""
    m, d = result.model, result.diagnostics
    ci = d.get("bootstrap", {}).get("ci95", {})
    t = Table(title=f"noise fit: {m.name}  ({d.get('n_cells', '?')} cells, {result.seconds:.2f} s)")
    for col in ("quantity", "value", "95% CI"):
        t.add_column(col)

    def fmt_ci(k: str) -> str:
        v = ci.get(k)
        return "-" if not v or not np.all(np.isfinite(v)) else f"[{v[0]:.4g}, {v[1]:.4g}]"

    for xg in (0.1, 0.5, 1.0):
        t.add_row(f"sigma_prog @ g/g_max={xg:g} (µS)", f"{float(m.sigma_prog(np.array(xg * m.g_max))):.4g}",
                  fmt_ci(f"sigma_prog@x={xg:g}"))
    t.add_row("prog poly degree", str(d.get("prog", {}).get("degree", "-")), "")
    if d.get("drift", {}).get("fitted"):
        for xg in (0.1, 0.5, 1.0):
            t.add_row(f"nu_mean @ {xg:g}", f"{float(m.nu_mean(np.array(xg))):.4g}", fmt_ci(f"nu_mean@x={xg:g}"))
        t.add_row("nu_std @ 0.5", f"{float(m.nu_std(np.array(0.5))):.4g}", "")
    else:
        t.add_row("drift", "not fitted", "")
    rn = d.get("read_noise", {})
    t.add_row("read noise model", str(rn.get("model", "not fitted")), "")
    if "a" in rn:
        t.add_row("read noise scale a", f"{rn['a']:.4g}", fmt_ci("read.a"))
    t.add_row("p_stuck_low", f"{m.p_stuck_low:.4g}", fmt_ci("p_stuck_low"))
    t.add_row("p_stuck_high", f"{m.p_stuck_high:.4g}", fmt_ci("p_stuck_high"))
    for k, g in d.get("goodness_of_fit", {}).items():
        t.add_row(f"KS {k} (D, p)", f"{g.get('ks_stat', float('nan')):.3g}, {g.get('p_value', float('nan')):.2g}", "")
    return t


def plot_report(result: FitResult, path: str | Path) -> Path:
    """sigma_prog vs g, nu distribution, read noise vs g, stuck-cell map; written as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    m, a = result.model, result.arrays
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    g = np.linspace(0, m.g_max, 200)
    ax[0, 0].plot(a.prog_x * m.g_max, a.prog_sigma, "o", ms=4, label="per-bin (data)")
    ax[0, 0].plot(g, m.sigma_prog(g), "-", label=f"fit (poly deg {len(m.prog_sigma.coeffs) - 1})")
    ax[0, 0].set(xlabel="target g (µS)", ylabel="σ_prog (µS)", title="programming noise")
    ax[0, 0].legend()
    if a.nu.size:
        ax[0, 1].scatter(a.nu_x * m.g_max, a.nu, s=1, alpha=0.2, label="per cell")
        ax[0, 1].plot(g, m.nu_mean(g / m.g_max), "r-", label="ν mean")
        ax[0, 1].plot(g, m.nu_mean(g / m.g_max) + m.nu_std(g / m.g_max), "r--", label="± ν std")
        ax[0, 1].plot(g, m.nu_mean(g / m.g_max) - m.nu_std(g / m.g_max), "r--")
        ax[0, 1].legend()
    else:
        ax[0, 1].text(0.5, 0.5, "drift not fitted", ha="center", transform=ax[0, 1].transAxes)
    ax[0, 1].set(xlabel="g_prog (µS)", ylabel="ν", title="drift exponent")
    if a.read_g.size:
        for tt in np.unique(a.read_t):
            s = a.read_t == tt
            ln = ax[1, 0].loglog(a.read_g[s], a.read_sigma[s], "o", ms=3, label=f"t={tt:g}s")[0]
            gg = np.geomspace(max(a.read_g[s].min(), 1e-3), a.read_g[s].max(), 100)
            ax[1, 0].loglog(gg, m.sigma_read(gg, float(tt)), "-", color=ln.get_color())
        ax[1, 0].legend(fontsize=7)
    else:
        ax[1, 0].text(0.5, 0.5, "read noise not fitted", ha="center", transform=ax[1, 0].transAxes)
    ax[1, 0].set(xlabel="g (µS)", ylabel="σ_read (µS)", title="read noise (points: data, lines: fit)")
    if a.stuck_code.size:
        x = a.stuck_col + (a.stuck_tile * (int(a.stuck_col.max()) + 2) if a.stuck_col.size else 0)
        for code, col, lab in ((1, "tab:blue", "stuck low"), (2, "tab:red", "stuck high")):
            s = a.stuck_code == code
            ax[1, 1].scatter(x[s], a.stuck_row[s], s=4, c=col, label=lab)
        ax[1, 1].invert_yaxis()
        ax[1, 1].legend()
    ax[1, 1].set(xlabel="tile-offset column", ylabel="row",
                 title=f"stuck cells (p_low={m.p_stuck_low:.3g}, p_high={m.p_stuck_high:.3g})")
    fig.suptitle(m.name)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p
