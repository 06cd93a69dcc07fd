"""`hil demo`: the whole chain on the simulated chip and a shipped tiny MoE model.

measure (characterise the chip) -> fit (noise model from the dump) -> deploy the model's routed
experts on the chip -> evaluate as deployed -> ROMER on the as-deployed weights -> reprogram the
replaced experts -> evaluate again. Prints the table that matters and writes plots.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hil.deploy import DeployConfig, DeployResult, ProgressFn, run_deploy
from hil.measure import MeasureConfig, MeasureResult, run_measurement
from hil.sim.chip import chip_truth
from noise_fit.fit import FitConfig, fit_dump
from noise_fit.model import NoiseModel

DEFAULT_MODEL = "data/models/olmoe-tiny"


@dataclass(frozen=True)
class DemoConfig:
    model: str = DEFAULT_MODEL
    out_dir: str = "out/demo"
    truth: str = "pcm-chip@16"  # the simulated chip: published PCM with 16x programming noise, plus stuck cells
    sim_seed: int = 0
    t_read: float = 3600.0
    rounds: int = 1
    calib_tokens: int = 8192
    eval_tokens: int = 16384
    measure_rows: int = 64


@dataclass
class DeviceComparison:
    quantity: str
    fitted: float
    true: float


@dataclass
class DemoResult:
    measure: MeasureResult
    device: list[DeviceComparison]
    deploy: DeployResult
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_models(fitted: NoiseModel, truth: NoiseModel) -> list[DeviceComparison]:
    """Fitted vs true device parameters at a few points of the conductance range."""
    rows = []
    for x in (0.1, 0.5, 1.0):
        g = np.array([x * truth.g_max])
        rows.append(DeviceComparison(f"sigma_prog at {x:g} g_max (µS)", float(fitted.sigma_prog(g)[0]),
                                     float(truth.sigma_prog(g)[0])))
    for x in (0.1, 0.5):
        rows.append(DeviceComparison(f"nu mean at {x:g} g_max", float(np.abs(fitted.nu_mean(np.array([x])))[0]),
                                     float(np.abs(truth.nu_mean(np.array([x])))[0])))
    g = np.array([0.5 * truth.g_max])
    rows.append(DeviceComparison("read noise at 0.5 g_max, t = 1 h (µS)", float(fitted.sigma_read(g, 3600.0)[0]),
                                 float(truth.sigma_read(g, 3600.0)[0])))
    rows.append(DeviceComparison("p stuck low", fitted.p_stuck_low, truth.p_stuck_low))
    rows.append(DeviceComparison("p stuck high", fitted.p_stuck_high, truth.p_stuck_high))
    return rows


def run_demo(cfg: DemoConfig, progress: ProgressFn | None = None) -> DemoResult:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(cfg.model) / "config.json").is_file():
        raise FileNotFoundError(f"model {cfg.model}: no config.json (the shipped models live in data/models/)")
    dump, noise_json, fit_png, run_h5 = out / "dump.h5", out / "noise.json", out / "fit.png", out / "deploy.h5"
    mres = run_measurement(MeasureConfig(out=str(dump), rows=cfg.measure_rows, sim_truth=cfg.truth,
                                         sim_seed=cfg.sim_seed, overwrite=True), progress=progress)
    fit = fit_dump(dump, FitConfig(n_boot=20))
    fit.model.to_json(noise_json)
    from noise_fit.report import plot_report

    plot_report(fit, fit_png)
    device = compare_models(fit.model, chip_truth(cfg.truth))
    dres = run_deploy(DeployConfig(model=cfg.model, out=str(run_h5), noise=str(noise_json), t_read=cfg.t_read,
                                   rounds=cfg.rounds, calib_tokens=cfg.calib_tokens, eval_tokens=cfg.eval_tokens,
                                   sim_truth=cfg.truth, sim_seed=cfg.sim_seed, overwrite=True), progress=progress)
    files = {"dump": str(dump), "noise_model": str(noise_json), "fit_report": str(fit_png), "run": str(run_h5)}
    files["rounds_plot"] = str(plot_rounds(dres, out / "rounds.png"))
    res = DemoResult(measure=mres, device=device, deploy=dres, files=files)
    (out / "demo.json").write_text(json.dumps(res.to_dict(), indent=2, default=str) + "\n")
    files["json"] = str(out / "demo.json")
    return res


def plot_rounds(res: DeployResult, path: Path) -> Path:
    """Perplexity and load balance per deployment round, against clean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    ks = [r.round for r in res.rounds]
    labels = ["deployed" if k == 0 else f"ROMER r{k}" for k in ks]
    a.bar(["clean", *labels], [res.clean_ppl, *[r.ppl for r in res.rounds]], color=["grey"] + ["C0"] * len(ks))
    if res.emulated_ppl is not None:
        a.axhline(res.emulated_ppl, ls="--", color="C3", label="emulated (fitted model)")
        a.legend(fontsize=8)
    a.set_ylabel("perplexity")
    a.set_title(f"{Path(res.model).name} on the chip")
    b.bar(["clean", *labels], [res.clean_load_cv, *[r.load_cv for r in res.rounds]], color=["grey"] + ["C1"] * len(ks))
    b.set_ylabel("expert load CV")
    b.set_title("load balance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
