"""`hil calibrate`: ROMER expert replacement + router calibration of a local MoE checkpoint.

Thin: parses arguments into a `romer.calibrate.CalibrateConfig`, calls `calibrate`, prints a table.
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the `calibrate` subcommand to the CLI."""

    @app.command("calibrate")
    def calibrate_cmd(
        model: Path = typer.Option(..., "--model", help="local checkpoint directory (never downloaded)"),
        noise: str = typer.Option(..., "--noise", help="noise.json or preset: pcm@16, hermes@8, gaussian:0.4"),
        calib_text: Path = typer.Option(..., "--calib-text", help="calibration text (never the evaluation text)"),
        out: Path = typer.Option(..., "--out", help="output directory: HF checkpoint + romer.json"),
        seeds: int = typer.Option(5, "--seeds", help="noise seeds of the evaluation table"),
        seed0: int = typer.Option(0, "--seed0", help="first evaluation seed"),
        eval_text: Path = typer.Option(None, "--eval-text", help="held-out text: evaluate all conditions"),
        json_out: Path = typer.Option(None, "--json", help="write the full result as JSON"),
        calib_mode: str = typer.Option("per_seed", "--calib-mode", help="per_seed (default) or held_out"),
        calib_seed: int = typer.Option(10_000, "--calib-seed", help="noise instance the saved calibration is fit on"),
        strategy: str = typer.Option("average", "--strategy",
                                     help="replacement: average (on Qwen2/DeepSeek-MoE: average_shared), "
                                     "average_shared, split or copy"),
        m: int = typer.Option(None, "--m", help="experts replaced per layer (0: no replacement; default: library's)"),
        select: str = typer.Option("threshold", "--select", help="threshold (default) or bottom (m least used)"),
        threshold: float = typer.Option(0.25, "--threshold", help="cold below this share of the uniform load"),
        router_mode: str = typer.Option(None, "--router-mode",
                                        help="router calibration: reference_free, layer, expert, expert_keep_scale "
                                             "or none (default: library's)"),
        parts: str = typer.Option("experts,shared,router", "--parts", help="analog parts (see hil eval)"),
        calib_tokens: int = typer.Option(16384, "--calib-tokens"),
        eval_tokens: int = typer.Option(32768, "--eval-tokens"),
        window: int = typer.Option(256, "--window", help="window length (tokens)"),
        batch_size: int = typer.Option(16, "--batch-size"),
    ) -> None:
        """Replace under-used experts, calibrate routers, save the calibrated model; optionally the ablation table."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Table

        from noise_fit.model import NoiseModelError
        from romer.adapters import UnsupportedModelError
        from romer.calibrate import CalibrateConfig, calibrate
        from romer.replace import ReplaceConfig
        from romer.router_calib import RouterCalibConfig

        console = Console()
        try:
            cfg = CalibrateConfig(
                model=model, noise=noise, calib_text=calib_text, out=out, eval_text=eval_text, seeds=seeds,
                seed0=seed0, calib_mode=calib_mode, calib_seed=calib_seed,
                replace=ReplaceConfig(strategy=strategy, select=select, m=ReplaceConfig.m if m is None else m,
                                      threshold=threshold),
                router=RouterCalibConfig(mode=router_mode or RouterCalibConfig.mode),
                parts=tuple(p.strip() for p in parts.split(",") if p.strip()),
                calib_tokens=calib_tokens, eval_tokens=eval_tokens, max_length=window, stride=window,
                batch_size=batch_size)
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console, transient=True) as bar:
                tasks: dict[str, int] = {}

                def progress(stage: str, done: int, total: int) -> None:
                    if stage not in tasks:
                        tasks[stage] = bar.add_task(stage, total=total)
                    bar.update(tasks[stage], completed=done, total=total)

                result = calibrate(cfg, progress=progress)
        except (FileNotFoundError, ValueError, RuntimeError, OSError, NotImplementedError, NoiseModelError,
                UnsupportedModelError) as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from None

        n_rep = sum(len(lp["cold"]) for lp in (result.plan or {}).get("layers", []))
        console.print(f"{result.family}: replaced {n_rep} expert slot(s) ({strategy}), router calibration "
                      f"{cfg.router.mode}, fit on noise instance {calib_seed}; wrote {result.out}")
        if result.conditions:
            table = Table(title=f"{result.family}: {model}  noise {result.noise['name']} "
                                f"(prog×{result.noise['prog_scale']:g}), {result.n_eval_tokens} eval tokens, "
                                f"{seeds} seeds, calibration {result.calib_mode}")
            for col in ("condition", "perplexity", "load CV", "max/mean", "Δ vs noisy %", "gap recovered %",
                        "wins"):
                table.add_column(col, justify="right")
            for c in result.conditions.values():
                table.add_row(c.name, f"{c.ppl_mean:.3f} ± {c.ppl_std:.3f}", f"{c.cv_mean:.3f}",
                              f"{c.max_mean_mean:.2f}",
                              "" if c.reduction_pct is None else f"{c.reduction_pct:+.2f}",
                              "" if c.gap_recovered_pct is None else f"{c.gap_recovered_pct:+.1f}",
                              "" if c.wins is None else f"{c.wins}/{len(c.ppl)}")
            console.print(table)
        console.print(f"{result.seconds:.1f} s")
        if json_out is not None:
            result.to_json(json_out)
            console.print(f"wrote {json_out}")
