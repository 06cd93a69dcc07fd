"""Benchmark of ROMER calibration: cost relative to a plain forward pass, and the hooks' eval overhead.

Why: calibration must be cheap next to programming a chip, and the routing hooks that a
calibrated model carries must not slow down inference (aim: < 5 % overhead).

    python -m bench.bench_calibrate [--model data/models/olmoe-tiny] [--tokens 16384] [--repeats 3]

Without a trained checkpoint a random-init OLMoE of the shipped shape is used (64 experts, top-8).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from romer.adapters import find_moe_blocks, load_model, load_tokenizer, tiny_config
from romer.calibrate import (
    CalibrateConfig,
    CalibrationSession,
    clean_logit_quantiles,
    fit_router_calibration,
    measure_load,
    token_batches,
)
from romer.calibrated import install_romer
from romer.perplexity import WindowConfig, perplexity, tokenize_file
from romer.replace import ReplaceConfig, apply_replacement, plan_replacement
from romer.router_calib import RouterCalibConfig

REPO = Path(__file__).resolve().parent.parent


def _model(path: str | None) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, str]:
    d = Path(path) if path else REPO / "data" / "models" / "olmoe-tiny"
    if (d / "config.json").is_file():
        model, tok = load_model(d), load_tokenizer(d)
        calib = tokenize_file(REPO / "data" / "text" / "calib.txt", tok)
        ev = tokenize_file(REPO / "data" / "text" / "eval.txt", tok)
        return model, calib, ev, str(d)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("olmoe", vocab_size=2048, hidden_size=128, num_layers=4, num_experts=64, top_k=8,
                      moe_intermediate=32)
    g = torch.Generator().manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return model, torch.randint(0, 2048, (1 << 16,), generator=g), torch.randint(0, 2048, (1 << 16,), generator=g), \
        "random-init olmoe (64 experts, top-8)"


def _best(fn: object, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="ROMER calibration benchmark")
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=16384, help="calibration (and eval) tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--noise", default="pcm@16")
    args = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    model, calib_ids, eval_ids, name = _model(args.model)
    calib_ids, eval_ids = calib_ids[: args.tokens], eval_ids[: args.tokens]
    blocks = find_moe_blocks(model)
    batches = token_batches(calib_ids, 256, 16)
    rcfg = RouterCalibConfig()
    n = int(calib_ids.numel())

    def forward() -> None:
        with torch.no_grad():
            for x, m in batches:
                model(input_ids=x, attention_mask=m)

    t_fwd = _best(forward, args.repeats)
    t_load = _best(lambda: measure_load(model, blocks, batches), args.repeats)
    counts, tokens = measure_load(model, blocks, batches)
    t_plan = _best(lambda: plan_replacement(counts, tokens, {b.layer: b.top_k for b in blocks}, ReplaceConfig()),
                   args.repeats)
    plan = plan_replacement(counts, tokens, {b.layer: b.top_k for b in blocks}, ReplaceConfig())
    t_apply = _best(lambda: apply_replacement(model, plan, blocks).restore(), args.repeats)
    t_cq = _best(lambda: clean_logit_quantiles(model, blocks, batches, rcfg), args.repeats)
    cq = clean_logit_quantiles(model, blocks, batches, rcfg)
    t_fit = _best(lambda: fit_router_calibration(model, blocks, batches, cq, rcfg), args.repeats)
    t_fit1 = _best(lambda: fit_router_calibration(model, blocks, batches, cq, RouterCalibConfig(mode="expert")),
                   args.repeats)
    t_fit2 = _best(lambda: fit_router_calibration(model, blocks, batches, cq,
                                                  RouterCalibConfig(mode="expert", sequential=False)), args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        s = CalibrationSession(CalibrateConfig(model=tmp, noise=args.noise, calib_tokens=args.tokens), model,
                               calib_ids)
        t_full = _best(lambda: s.fit(10_000, True, True), 1)  # the defaults: gated replacement, auto router mode
        # hooks for the overhead measurement: a fixed per-expert map and 4 averaged replicas per layer, so
        # that both hooks are surely installed (auto / the gate may choose to install nothing)
        forced = CalibrateConfig(model=tmp, noise=args.noise, calib_tokens=args.tokens,
                                 replace=ReplaceConfig(select="bottom", m=4, gate=False),
                                 router=RouterCalibConfig(mode="expert"))
        plan_n, calib_n = CalibrationSession(forced, model, calib_ids).fit(10_000, True, True)

    wcfg = WindowConfig(256, 256, 16)

    def ev(hooks: bool, with_plan: bool) -> float:
        p = plan_n if with_plan else None
        t0 = time.perf_counter()
        with apply_replacement(model, p, blocks) if p else _Null(), \
                install_romer(model, p, calib_n if hooks else None, blocks):
            perplexity(model, eval_ids, wcfg)
        return time.perf_counter() - t0

    runs: dict[tuple[bool, bool], float] = {}
    for _ in range(args.repeats):  # interleaved, so that load from other processes hits all three alike
        for key in ((False, False), (True, False), (True, True)):
            runs[key] = min(runs.get(key, float("inf")), ev(*key))
    t_off, t_on, t_romer = runs[(False, False)], runs[(True, False)], runs[(True, True)]

    console = Console()
    t = Table(title=f"ROMER calibration on {name}, {n} calibration tokens (best of {args.repeats})")
    for col in ("step", "seconds", "× plain forward"):
        t.add_column(col, justify="right")
    for label, sec in (("plain forward over the calibration tokens", t_fwd), ("load measurement", t_load),
                       ("replacement plan", t_plan), ("apply replacement (+restore)", t_apply),
                       ("clean logit quantiles", t_cq), ("router fit, auto over 5 modes (default)", t_fit),
                       ("router fit, one mode (expert), sequential", t_fit1),
                       ("router fit, one mode (expert), one pass", t_fit2),
                       (f"full default fit, one {args.noise} instance (load, plan, gate, auto router)", t_full)):
        t.add_row(label, f"{sec:.3f}", f"{sec / t_fwd:.2f}")
    console.print(t)
    e = Table(title=f"eval throughput, {int(eval_ids.numel())} tokens")
    for col in ("model", "tokens/s", "overhead vs plain"):
        e.add_column(col, justify="right")
    for label, sec in (("plain", t_off), ("router calibration hooks on", t_on),
                       ("ROMER (4 averaged replicas/layer + router hooks)", t_romer)):
        e.add_row(label, f"{eval_ids.numel() / sec:.0f}", f"{100 * (sec / t_off - 1):+.1f} %")
    console.print(e)
    return 0


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
