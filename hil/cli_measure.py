"""`hil measure` and `hil sim-server`: argument parsing over `hil.measure` and `hil.sim`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hil.driver import DeviceStringError
from hil.measure import MeasureConfig, MeasureError, MeasureResult, run_measurement
from hil.profile import ChipProfile, SafetyError
from hil.protocol import DeviceError, ProgramSettings
from hil.transport import TransportError
from noise_fit.model import NoiseModelError

console = Console(stderr=True)


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(2)


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        _fail(f"{what}: expected comma-separated numbers, got {text!r}")
        raise


def print_measure_table(res: MeasureResult) -> None:
    t = Table(title=f"measurement: {res.out}", show_header=True)
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("device", res.device_idn)
    t.add_row("cells", f"{res.cells:,}")
    t.add_row("verified", f"{100 * res.verified_fraction:.2f} %")
    t.add_row("mean pulses / cell", f"{res.mean_pulses:.2f}")
    t.add_row("stuck (device-reported)", f"{res.stuck_reported:,}")
    for ts, g in zip(res.times_s, res.mean_g_by_time, strict=True):
        t.add_row(f"mean G at t = {ts:g} s", f"{g:.3f} µS")
    t.add_row("read noise (std of repeats)", f"{res.read_noise_us:.4f} µS")
    t.add_row("link retries", str(res.retries))
    t.add_row("resumed", str(res.resumed))
    Console().print(t)


def register(app: typer.Typer) -> None:
    @app.command()
    def measure(
        device: str = typer.Option("sim", help="sim | sim:HOST:PORT | visa:RESOURCE | serial:PORT"),
        out: Path = typer.Option(Path("dump.h5"), help="HDF5 dump to write"),
        tiles: str = typer.Option("", help="comma-separated tile indices (default: all)"),
        rows: int = typer.Option(64, help="rows measured per tile"),
        cols: int = typer.Option(256, help="columns measured per tile"),
        levels: int = typer.Option(16, help="target conductance levels spanning the range"),
        times: str = typer.Option("1,60,3600,86400", help="read times after programming, s (device clock)"),
        repeats: int = typer.Option(3, help="reads per time"),
        seed: int = typer.Option(0, help="pattern seed"),
        tolerance: float = typer.Option(0.2, help="write-verify tolerance, µS"),
        max_pulses: int = typer.Option(20, help="write-verify pulse budget per cell"),
        v_max: float = typer.Option(2.5, help="largest programming pulse amplitude, V"),
        resume: bool = typer.Option(False, help="continue an interrupted dump"),
        overwrite: bool = typer.Option(False, help="replace an existing dump"),
        timeout: float = typer.Option(5.0, help="per-command timeout, s"),
        truth: str = typer.Option("pcm-chip", help="simulated chip only: ground truth (pcm-chip, a preset, or json)"),
        sim_seed: int = typer.Option(0, help="simulated chip only: device seed"),
        as_json: bool = typer.Option(False, "--json", help="print the summary as JSON on stdout"),
    ) -> None:
        """Program a characterisation pattern, read it back over time, write an HDF5 dump."""
        tile_list = tuple(int(x) for x in tiles.split(",")) if tiles.strip() else None
        cfg = MeasureConfig(
            device=device, out=str(out), tiles=tile_list, rows=rows, cols=cols, levels=levels,
            times_s=_floats(times, "--times"), repeats=repeats, seed=seed,
            settings=ProgramSettings(tolerance_us=tolerance, max_pulses=max_pulses, v_max=v_max),
            resume=resume, overwrite=overwrite, timeout_s=timeout, sim_truth=truth, sim_seed=sim_seed,
        )
        try:
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console, disable=as_json) as bar:
                tasks: dict[str, int] = {}

                def progress(stage: str, done: int, total: int) -> None:
                    if stage not in tasks:
                        tasks[stage] = bar.add_task(f"{stage:8s}", total=total)
                    bar.update(tasks[stage], completed=done)

                res = run_measurement(cfg, progress=progress)
        except (MeasureError, DeviceStringError, SafetyError, NoiseModelError, TransportError, DeviceError) as e:
            _fail(str(e))
            return
        if as_json:
            print(json.dumps(res.to_dict(), indent=2))
        else:
            print_measure_table(res)

    @app.command("sim-server")
    def sim_server(
        port: int = typer.Option(5025, help="TCP port (0: pick a free one)"),
        host: str = typer.Option("127.0.0.1", help="bind address"),
        truth: str = typer.Option("pcm-chip", help="ground truth (pcm-chip, a preset, or json)"),
        seed: int = typer.Option(0, help="device seed"),
        tiles: int = typer.Option(4), rows: int = typer.Option(256), cols: int = typer.Option(256),
        pty: bool = typer.Option(False, help="also serve on a pseudo-terminal (printed)"),
        state: Path = typer.Option(None, help="keep the chip's non-volatile state in this .npz"),
    ) -> None:
        """Serve a simulated chip: VISA TCPIP::HOST::PORT::SOCKET, serial socket://HOST:PORT."""
        from hil.sim.chip import SimChip, chip_truth
        from hil.sim.device import SimDevice
        from hil.sim.server import SimPtyServer, SimTCPServer

        try:
            model = chip_truth(truth)
        except NoiseModelError as e:
            _fail(str(e))
            return
        profile = ChipProfile(tiles=tiles, rows=rows, cols=cols, g_max=model.g_max)
        dev = SimDevice(SimChip(profile, model, seed=seed), state_path=state)
        srv = SimTCPServer(dev, host=host, port=port)
        console.print(f"simulated chip {dev.idn()} on {srv.visa_resource} (serial: {srv.serial_url})")
        pty_srv = SimPtyServer(dev).start() if pty else None
        if pty_srv:
            console.print(f"pty: serial:{pty_srv.path}")
        try:
            srv.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            if pty_srv:
                pty_srv.stop()
