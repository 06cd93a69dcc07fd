"""Benchmark of the ROMER core: noise injection time and memory, eval tokens/s clean vs noisy + hooks.

Run: ``.venv/bin/python -m bench.bench_romer_core [--big-layers 2] [--skip-big] [--workers 1 2]
[--backups memory disk]``. RSS GB is the process's resident memory while the noise is in.

- tiny: the trained checkpoints under data/models/ (olmoe-tiny, qwen2moe-tiny, deepseekmoe-tiny)
  when present, else random models of the same shape as FINDINGS.md (4 layers, hidden 128,
  16 experts, top-4);
- big: a randomly initialised OLMoE-1B-7B-shaped model (hidden 2048, 64 experts of 1024, top-8)
  with fewer layers (2 layers ~ 1.0 B parameters), to measure injection throughput and memory.
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from noise_fit.presets import resolve
from romer.adapters import load_model, load_tokenizer, tiny_config
from romer.inject import InjectConfig, inject_noise
from romer.perplexity import WindowConfig, perplexity, tokenize_file
from romer.stats import RoutingRecorder

REPO = Path(__file__).resolve().parents[1]
TRAINED = {"olmoe-tiny": "olmoe", "qwen2moe-tiny": "qwen2_moe", "deepseekmoe-tiny": "deepseek_v3"}


@dataclass
class Row:
    """One benchmark line."""

    model: str
    params_m: float
    analog_m: float
    inject_s: float
    restore_s: float
    workers: int
    backup: str
    ns_per_weight: float
    rss_gb: float
    tok_s_clean: float
    tok_s_noisy: float


def rss_gb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in GB, from /proc."""
    cur = peak = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            cur = int(line.split()[1]) / 2**20
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 2**20
    return cur, peak


def tokens_per_s(model: torch.nn.Module, ids: torch.Tensor, wcfg: WindowConfig, hooks: bool) -> float:
    t = time.perf_counter()
    if hooks:
        with RoutingRecorder(model) as rec:
            res = perplexity(model, ids, wcfg, rec.set_mask)
    else:
        res = perplexity(model, ids, wcfg)
    return res.n_tokens / (time.perf_counter() - t)


def bench_model(name: str, model: torch.nn.Module, ids: torch.Tensor, wcfg: WindowConfig, noise: str,
                parts: tuple[str, ...], workers: int, backup: str = "memory") -> Row:
    clean = tokens_per_s(model, ids, wcfg, hooks=False)
    h = inject_noise(model, resolve(noise), InjectConfig(parts=parts, workers=workers, backup=backup), seed=0)
    cur, _ = rss_gb()
    noisy = tokens_per_s(model, ids, wcfg, hooks=True)
    t = time.perf_counter()
    h.restore()
    restore = time.perf_counter() - t
    n = sum(p.numel() for p in model.parameters())
    ns = h.seconds / max(h.n_weights, 1) * 1e9
    return Row(name, n / 1e6, h.n_weights / 1e6, h.seconds, restore, workers, backup, ns, cur, clean, noisy)


def tiny_models() -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    out = []
    text = REPO / "data" / "text" / "eval.txt"
    for d, fam in TRAINED.items():
        path = REPO / "data" / "models" / d
        if (path / "config.json").exists():
            model = load_model(path)
            try:
                ids = tokenize_file(text, load_tokenizer(path), 4096)
            except (OSError, ValueError):
                ids = torch.randint(0, model.config.vocab_size, (4096,))
            out.append((d, model, ids))
        else:
            torch.manual_seed(0)
            cfg = tiny_config(fam, vocab_size=2048, hidden_size=128, num_layers=4, num_experts=16, top_k=4,
                              moe_intermediate=128)
            model = AutoModelForCausalLM.from_config(cfg).eval()
            out.append((f"{fam} (random)", model, torch.randint(0, 2048, (4096,),
                                                                generator=torch.Generator().manual_seed(0))))
    return out


def big_model(layers: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("olmoe", vocab_size=50304, hidden_size=2048, num_layers=layers, num_experts=64, top_k=8,
                      moe_intermediate=1024, num_attention_heads=16, num_key_value_heads=16)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def print_table(rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="romer core: noise injection (pcm, differential, t = 1 h, drift comp.) and eval throughput")
    for c in ("model", "params M", "analog M", "workers", "backup", "inject s", "ns/weight", "restore s", "RSS GB",
              "tok/s clean", "tok/s noisy+hooks"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r.model, f"{r.params_m:.1f}", f"{r.analog_m:.1f}", str(r.workers), r.backup, f"{r.inject_s:.3f}",
                  f"{r.ns_per_weight:.0f}", f"{r.restore_s:.3f}", f"{r.rss_gb:.2f}", f"{r.tok_s_clean:.0f}",
                  f"{r.tok_s_noisy:.0f}")
    Console(width=200).print(t)


def main(argv: list[str] | None = None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big-layers", type=int, default=2, help="layers of the OLMoE-shaped big model")
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--noise", default="pcm")
    ap.add_argument("--backups", nargs="+", default=["memory", "disk"], help="backups tried on the big model")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows: list[Row] = []
    wcfg = WindowConfig(max_length=256, stride=256, batch_size=4)
    parts = ("experts", "router", "shared")
    for name, model, ids in tiny_models():
        for w in args.workers:
            rows.append(bench_model(name, model, ids, wcfg, args.noise, parts, w))
        del model
    if not args.skip_big:
        gc.collect()
        before, _ = rss_gb()
        t = time.perf_counter()
        model = big_model(args.big_layers)
        build = time.perf_counter() - t
        after, _ = rss_gb()
        ids = torch.randint(0, 50304, (1024,), generator=torch.Generator().manual_seed(0))
        big_w = WindowConfig(max_length=512, stride=512, batch_size=1)
        for w in args.workers:
            for b in args.backups:
                rows.append(bench_model(f"olmoe-shape {args.big_layers}L", model, ids, big_w, args.noise,
                                        ("experts",), w, b))
        _, peak = rss_gb()
        print(f"big model: built in {build:.1f} s, weights {after - before:.2f} GB RSS, process peak {peak:.2f} GB")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
