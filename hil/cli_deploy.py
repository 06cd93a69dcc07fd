"""`hil deploy` and `hil demo`: argument parsing over `hil.deploy` and `hil.demo`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hil.deploy import DeployConfig, DeployError, DeployResult, run_deploy
from hil.driver import DeviceStringError
from hil.profile import SafetyError
from hil.protocol import DeviceError, ProgramSettings
from hil.transport import TransportError
from noise_fit.model import NoiseModelError
from romer.adapters import UnsupportedModelError

console = Console(stderr=True)
ERRORS = (DeployError, DeviceStringError, SafetyError, DeviceError, TransportError, NoiseModelError,
          UnsupportedModelError, FileNotFoundError, ValueError)


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(2)


class _Bars:
    """Rich progress bars keyed by stage name."""

    def __init__(self, disable: bool) -> None:
        self.bar = Progress(TextColumn("{task.description:14s}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, disable=disable, transient=False)
        self.tasks: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total)
        self.bar.update(self.tasks[stage], completed=done)


def deploy_table(res: DeployResult) -> Table:
    t = Table(title=f"{Path(res.model).name} deployed on {res.device_idn}",
              caption="ppl: eval perplexity; CV, max/mean: expert load balance; overlap: top-k overlap with clean "
                      "routing; ΔW/W: relative error of the chip-held weights; emulated: the same parts perturbed "
                      f"with the noise model ({res.noise_model}) instead of the chip")
    for col in ("model", "ppl", "×clean", "CV", "max/mean", "overlap", "blocks", "verified", "ΔW/W"):
        t.add_column(col, justify="right" if col != "model" else "left")
    t.add_row("clean", f"{res.clean_ppl:.2f}", "1.000", f"{res.clean_load_cv:.3f}",
              f"{res.clean_load_max_mean:.2f}", "1.000", "", "", "")
    if res.emulated_ppl is not None:
        t.add_row("emulated (fit)", f"{res.emulated_ppl:.2f}", f"{res.emulated_ppl / res.clean_ppl:.3f}",
                  "", "", "", "", "", "")
    for r in res.rounds:
        name = "deployed" if r.round == 0 else f"ROMER r{r.round} ({r.replaced} repl.)"
        t.add_row(name, f"{r.ppl:.2f}", f"{r.ppl / res.clean_ppl:.3f}", f"{r.load_cv:.3f}", f"{r.load_max_mean:.2f}",
                  f"{r.overlap:.3f}", str(r.blocks_programmed), f"{100 * r.verified_fraction:.1f} %",
                  f"{r.weight_rel_error:.3f}")
    return t


def register(app: typer.Typer) -> None:
    @app.command()
    def deploy(
        model: Path = typer.Option(..., help="local model directory (plain or calibrated)"),
        device: str = typer.Option("sim", help="sim | sim:HOST:PORT | visa:RESOURCE | serial:PORT"),
        noise: str = typer.Option(None, help="noise model (json or preset) for parts that do not fit the chip"),
        out: Path = typer.Option(Path("deploy.h5"), help="HDF5 run file"),
        parts: str = typer.Option("experts", help="analog parts: experts,shared,router,attention,dense,lm_head"),
        layers: str = typer.Option("", help="comma-separated MoE layers to put on the chip (default: all)"),
        overflow: str = typer.Option("emulate", help="what does not fit: emulate | digital"),
        t_read: float = typer.Option(3600.0, help="device time between programming and read-back, s"),
        rounds: int = typer.Option(1, help="ROMER recalibration rounds"),
        no_romer: bool = typer.Option(False, "--no-romer", help="deploy and evaluate only"),
        calib_text: Path = typer.Option(Path("data/text/calib.txt")),
        eval_text: Path = typer.Option(Path("data/text/eval.txt")),
        calib_tokens: int = typer.Option(16384), eval_tokens: int = typer.Option(16384),
        tolerance: float = typer.Option(0.2, help="write-verify tolerance, µS"),
        resume: bool = typer.Option(False), overwrite: bool = typer.Option(False),
        truth: str = typer.Option("pcm-chip", help="simulated chip only: ground truth"),
        sim_seed: int = typer.Option(0, help="simulated chip only: device seed"),
        sim_tiles: int = typer.Option(None, help="simulated chip only: tiles (default: what the model needs)"),
        as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    ) -> None:
        """Program the model onto the chip, read it back, evaluate, recalibrate with ROMER, redeploy."""
        try:
            cfg = DeployConfig(
                model=str(model), device=device, out=str(out), noise=noise,
                parts=tuple(p.strip() for p in parts.split(",") if p.strip()),
                layers=tuple(int(x) for x in layers.split(",")) if layers.strip() else None,
                overflow=overflow, t_read=t_read, rounds=rounds, romer=not no_romer, calib_text=str(calib_text),
                eval_text=str(eval_text), calib_tokens=calib_tokens, eval_tokens=eval_tokens,
                settings=ProgramSettings(tolerance_us=tolerance), resume=resume, overwrite=overwrite,
                sim_truth=truth, sim_seed=sim_seed, sim_tiles=sim_tiles)
            bars = _Bars(as_json)
            with bars.bar:
                res = run_deploy(cfg, progress=bars)
        except ERRORS as e:
            _fail(str(e))
            return
        if as_json:
            print(json.dumps(res.to_dict(), indent=2, default=str))
        else:
            Console(width=max(Console().width, 100)).print(deploy_table(res))
            console.print(f"placement: {res.placement}")

    @app.command()
    def demo(
        model: Path = typer.Option(Path("data/models/olmoe-tiny"), help="a shipped tiny MoE model"),
        out_dir: Path = typer.Option(Path("out/demo"), help="where the dump, noise model, run file and plots go"),
        truth: str = typer.Option("pcm-chip@16", help="the simulated chip's ground truth"),
        rounds: int = typer.Option(1), eval_tokens: int = typer.Option(16384),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """The whole chain on the simulated chip: measure, fit, deploy, ROMER, redeploy."""
        from hil.demo import DemoConfig, run_demo

        try:
            bars = _Bars(as_json)
            with bars.bar:
                res = run_demo(DemoConfig(model=str(model), out_dir=str(out_dir), truth=truth, rounds=rounds,
                                          eval_tokens=eval_tokens), progress=bars)
        except ERRORS as e:
            _fail(str(e))
            return
        if as_json:
            print(json.dumps(res.to_dict(), indent=2, default=str))
            return
        dev = Table(title="device: fitted from the measurement vs the simulated chip's truth")
        for col in ("quantity", "fitted", "true", "ratio"):
            dev.add_column(col, justify="left" if col == "quantity" else "right")
        for d in res.device:
            dev.add_row(d.quantity, f"{d.fitted:.4g}", f"{d.true:.4g}", f"{d.fitted / d.true:.3f}" if d.true else "")
        Console().print(dev)
        Console(width=max(Console().width, 100)).print(deploy_table(res.deploy))
        console.print("files: " + ", ".join(f"{k}={v}" for k, v in res.files.items()))
