"""`hil eval`: clean vs noisy perplexity and expert load of a local MoE checkpoint.

Thin: parses arguments into a `romer.evaluate.EvalConfig`, calls `evaluate`, prints a table.
"""

from __future__ import annotations

from pathlib import Path

import typer


def _parse_tile(tile: str | None) -> tuple[int, int] | None:
    if not tile:
        return None
    try:
        r, _, c = tile.lower().partition("x")
        return int(r), int(c or r)
    except ValueError:
        raise typer.BadParameter(f"tile must look like 256x256, got {tile!r}") from None


def register(app: typer.Typer) -> None:
    """Add the `eval` subcommand to the CLI."""

    @app.command("eval")
    def eval_cmd(
        model: Path = typer.Option(..., "--model", help="local checkpoint directory (never downloaded)"),
        noise: str = typer.Option("pcm", "--noise", help="noise.json or preset: pcm, pcm@8, gaussian:0.1"),
        text: Path = typer.Option(None, "--text", help="UTF-8 text file to score"),
        dataset: str = typer.Option(None, "--dataset", help="cached `datasets` name[:config[:split]]"),
        seeds: int = typer.Option(3, "--seeds", help="number of noise seeds"),
        seed0: int = typer.Option(0, "--seed0", help="first noise seed"),
        json_out: Path = typer.Option(None, "--json", help="write the full result as JSON"),
        window: int = typer.Option(512, "--window", help="sliding-window length (tokens)"),
        stride: int = typer.Option(256, "--stride", help="sliding-window stride (tokens)"),
        batch_size: int = typer.Option(4, "--batch-size"),
        max_tokens: int = typer.Option(32768, "--max-tokens", help="cut the text to this many tokens (0: all)"),
        parts: str = typer.Option("experts", "--parts",
                                  help="analog parts: experts,shared,router,attention,dense,lm_head or all"),
        t_read: float = typer.Option(3600.0, "--t-read", help="read time after programming (s)"),
        drift_comp: bool = typer.Option(True, "--drift-comp/--no-drift-comp", help="global drift compensation"),
        per_row: bool = typer.Option(False, "--per-row", help="one conductance scale per output row"),
        tile: str = typer.Option(None, "--tile", help="crossbar tile size, e.g. 256x256 (own scale per tile)"),
        workers: int = typer.Option(1, "--workers", help="threads for noise injection"),
        heatmap: Path = typer.Option(None, "--heatmap", help="PNG prefix for load heatmaps"),
        dtype: str = typer.Option("float32", "--dtype", help="model dtype: float32, bfloat16"),
        backup: str = typer.Option("memory", "--backup", help="clean-weight backup: memory or disk (big models)"),
    ) -> None:
        """Perplexity (mean ± std over noise seeds), load CV, max/mean and top-k overlap, clean vs noisy."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Table

        from noise_fit.model import NoiseModelError
        from romer.adapters import UnsupportedModelError
        from romer.evaluate import EvalConfig, evaluate

        console = Console()
        try:
            cfg = EvalConfig(
                model=model, noise=noise, text=text, dataset=dataset, seeds=seeds, seed0=seed0,
                max_length=window, stride=stride, batch_size=batch_size, max_tokens=max_tokens or None,
                parts=tuple(p.strip() for p in parts.split(",") if p.strip()), t_read=t_read,
                drift_compensation=drift_comp, per_row=per_row, tile=_parse_tile(tile), workers=workers,
                heatmap=heatmap, dtype=dtype, backup=backup)
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console, transient=True) as bar:
                tasks: dict[str, int] = {}

                def progress(stage: str, done: int, total: int) -> None:
                    if stage not in tasks:
                        tasks[stage] = bar.add_task(stage, total=total)
                    bar.update(tasks[stage], completed=done)

                result = evaluate(cfg, progress=progress)
        except (FileNotFoundError, ValueError, RuntimeError, OSError, NoiseModelError, UnsupportedModelError) as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from None

        table = Table(title=f"{result.family}: {model}  noise {result.noise['name']} "
                            f"(prog×{result.noise['prog_scale']:g}), {result.n_tokens} tokens")
        for col in ("", "perplexity", "load CV", "max/mean", "min/mean", "top-k overlap"):
            table.add_column(col, justify="right")
        cl = result.clean_load
        table.add_row("clean", f"{result.clean_ppl:.3f}", f"{cl.cv:.3f}", f"{cl.max_mean:.2f}",
                      f"{cl.min_mean:.2f}", "1.000")
        for s in result.seeds:
            table.add_row(f"seed {s.seed}", f"{s.ppl:.3f}", f"{s.load.cv:.3f}", f"{s.load.max_mean:.2f}",
                          f"{s.load.min_mean:.2f}", f"{s.overlap:.3f}")
        table.add_row("noisy mean", f"{result.noisy_ppl_mean:.3f} ± {result.noisy_ppl_std:.3f}",
                      f"{result.noisy_cv_mean:.3f}", f"{result.noisy_max_mean_mean:.2f}", "",
                      f"{result.overlap_mean:.3f} ± {result.overlap_std:.3f}")
        console.print(table)
        console.print(f"{result.seconds:.1f} s; {result.tokens_per_s_clean:.0f} tok/s clean, "
                      f"{result.tokens_per_s_noisy:.0f} tok/s noisy+hooks")
        if json_out is not None:
            result.to_json(json_out)
            console.print(f"wrote {json_out}")
