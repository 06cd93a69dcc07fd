#!/usr/bin/env python
"""The ROMER proof: ablation table over families and chip presets, plus the ablations that chose the defaults.

For every shipped tiny model (data/models/{olmoe-tiny,qwen2moe-tiny,deepseekmoe-tiny}) and every
noise spec: clean, noisy, replacement only, router calibration only, ROMER (both) and the noisy
model with a noise-free (digital) router, mean ± std perplexity over noise seeds, load CV and
max/mean, reduction vs noisy, share of the noise gap recovered (`romer.calibrate.calibrate`).
Calibration uses data/text/calib.txt only; evaluation data/text/eval.txt only.

Then, per family at one noise level, the variants behind every default (`--ablation-noise`):
replacement strategy and m, router calibration mode, sequential vs one-pass fit, calibration on
a held-out instance, and the noise-free cost of replacement.

Writes results/proof.json and results/proof.md. Without trained checkpoints, ``--random``
uses random-init models of the same shapes (development only: their numbers mean nothing).

    python scripts/romer_proof.py                        # defaults: ~15 min on 2 cores
    python scripts/romer_proof.py --no-ablations --seeds 3
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from romer.adapters import load_model, load_tokenizer, model_family, tiny_config  # noqa: E402
from romer.calibrate import (  # noqa: E402
    CalibrateConfig,
    CalibrationSession,
    calibrate,
)
from romer.perplexity import tokenize_file  # noqa: E402
from romer.replace import ReplaceConfig  # noqa: E402
from romer.router_calib import RouterCalibConfig  # noqa: E402

MODELS = ("olmoe-tiny", "qwen2moe-tiny", "deepseekmoe-tiny")
PAPER = {"olmoe-tiny": ("OLMoE", 59.8), "qwen2moe-tiny": ("Qwen-MoE", 58.8), "deepseekmoe-tiny": ("DeepSeek-MoE", 58.6)}
CALIB = REPO / "data" / "text" / "calib.txt"
EVAL = REPO / "data" / "text" / "eval.txt"


def variants() -> dict[str, tuple[ReplaceConfig | None, RouterCalibConfig | None, str]]:
    """name -> (replacement, router calibration, instance): 'same' (calibrate on the eval instance), 'held_out'
    (calibrate on instance 10000), 'clean' (no noise at all: the cost of replacement itself)."""
    return {
        "replace copy m=8": (ReplaceConfig(strategy="copy", select="bottom", gate=False, m=8), None, "same"),
        "replace split m=8": (ReplaceConfig(strategy="split", select="bottom", gate=False, m=8), None, "same"),
        "replace average threshold 0.25 (m<=4)": (ReplaceConfig(gate=False), None, "same"),
        "replace average m=2": (ReplaceConfig(strategy="average", select="bottom", gate=False, m=2), None, "same"),
        "replace average m=4": (ReplaceConfig(strategy="average", select="bottom", gate=False, m=4), None, "same"),
        "replace average m=32": (ReplaceConfig(strategy="average", select="bottom", gate=False, m=32), None, "same"),
        "replace average m=8": (ReplaceConfig(strategy="average", select="bottom", gate=False, m=8), None, "same"),
        "replace average m=16": (ReplaceConfig(strategy="average", select="bottom", gate=False, m=16), None, "same"),
        "router layer": (None, RouterCalibConfig(mode="layer"), "same"),
        "router layer one-pass": (None, RouterCalibConfig(mode="layer", sequential=False), "same"),
        "router reference_free one-pass": (None, RouterCalibConfig(mode="reference_free", sequential=False), "same"),
        "router expert": (None, RouterCalibConfig(mode="expert"), "same"),
        "router expert_keep_scale": (None, RouterCalibConfig(mode="expert_keep_scale"), "same"),
        "router reference_free": (None, RouterCalibConfig(mode="reference_free"), "same"),
        "romer threshold + reference_free, held-out instance": (
            ReplaceConfig(gate=False), RouterCalibConfig(mode="reference_free"), "held_out"),
        "romer average m=4 + reference_free": (
            ReplaceConfig(select="bottom", gate=False, m=4), RouterCalibConfig(mode="reference_free"), "same"),
        "replace average m=4, no noise": (
            ReplaceConfig(strategy="average", select="bottom", gate=False, m=4), None, "clean"),
        "router reference_free, no noise": (None, RouterCalibConfig(mode="reference_free"), "clean"),
    }


def random_model_dir(name: str, root: Path) -> Path:
    """A random-init stand-in of a shipped model (same family and routing shape) with a byte tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    d = root / name
    if (d / "config.json").is_file():
        return d
    fam, e, k = {"olmoe-tiny": ("olmoe", 64, 8), "qwen2moe-tiny": ("qwen2_moe", 60, 4),
                 "deepseekmoe-tiny": ("qwen2_moe", 64, 6)}[name]
    torch.manual_seed(0)
    cfg = tiny_config(fam, vocab_size=256, hidden_size=128, num_layers=4, num_experts=e, top_k=k, moe_intermediate=32)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(d))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(d))
    return d


def cond_row(c: Any) -> dict[str, Any]:
    return {k: v for k, v in asdict(c).items()}


def run_ablations(cfg: CalibrateConfig, model: Any, tok: Any, seeds: list[int], log: Any) -> dict[str, Any]:
    calib_ids = tokenize_file(cfg.calib_text, tok, cfg.calib_tokens)
    eval_ids = tokenize_file(EVAL, tok, cfg.eval_tokens)
    s = CalibrationSession(cfg, model, calib_ids)
    clean_ppl, _ = s.evaluate(eval_ids, None, None, None)
    out: dict[str, Any] = {"noise": str(cfg.noise), "seeds": seeds, "clean_ppl": clean_ppl, "noisy": [],
                           "variants": {}}
    for name in variants():
        out["variants"][name] = {"ppl": [], "cv": [], "max_mean": []}
    for seed in seeds:
        ppl, load = s.evaluate(eval_ids, seed, None, None)
        out["noisy"].append(ppl)
        for name, (rep, rout, inst) in variants().items():
            t0 = time.perf_counter()
            if inst == "clean":
                if seed != seeds[0]:
                    continue  # noise-free: one run is enough
                vp, vl = s.variant(eval_ids, None, rep, rout, calib_seed=None)
            else:
                vp, vl = s.variant(eval_ids, seed, rep, rout, calib_seed=cfg.calib_seed if inst == "held_out" else None)
            v = out["variants"][name]
            v["ppl"].append(vp)
            v["cv"].append(vl.cv)
            v["max_mean"].append(vl.max_mean)
            log(f"    seed {seed} {name}: {vp:.3f} (noisy {ppl:.3f}) {time.perf_counter() - t0:.1f}s")
    noisy = np.array(out["noisy"])
    for name, v in out["variants"].items():
        p = np.array(v["ppl"])
        if variants()[name][2] == "clean":
            v["vs_clean_pct"] = float(100 * (p[0] - clean_ppl) / clean_ppl)
        else:
            red = 100 * (noisy - p) / noisy
            v["reduction_pct_mean"] = float(red.mean())
            v["reduction_pct_std"] = float(red.std(ddof=1)) if red.size > 1 else 0.0
        v["cv_mean"] = float(np.mean(v["cv"]))
    out["noisy_mean"] = float(noisy.mean())
    return out


def fmt_table(entry: dict[str, Any]) -> list[str]:
    lines = [f"#### {entry['family_label']} ({entry['model']}), noise `{entry['noise']}`: "
             f"{entry['n_eval_tokens']} eval tokens, {entry['seeds']} seeds, calibration `{entry['calib_mode']}`, "
             f"{entry['seconds']:.0f} s", "",
             "| condition | perplexity | load CV | max/mean | Δ vs noisy (of means) | paired Δ per seed "
             "| gap recovered | wins |",
             "|---|---|---|---|---|---|---|---|"]
    for c in entry["conditions"].values():
        red = "" if c["reduction_pct"] is None else f"{c['reduction_pct']:+.2f} %"
        pair = "" if c["reduction_pct_paired"] is None else \
            f"{c['reduction_pct_paired'][0]:+.2f} ± {c['reduction_pct_paired'][1]:.2f} %"
        gap = "" if c["gap_recovered_pct"] is None else f"{c['gap_recovered_pct']:+.1f} %"
        wins = "" if c["wins"] is None else f"{c['wins']}/{len(c['ppl'])}"
        lines.append(f"| {c['name']} | {c['ppl_mean']:.3f} ± {c['ppl_std']:.3f} | {c['cv_mean']:.3f} | "
                     f"{c['max_mean_mean']:.2f} | {red} | {pair} | {gap} | {wins} |")
    return lines


def write_markdown(doc: dict[str, Any], path: Path) -> None:
    lines = ["# ROMER proof run", "",
             f"Command: `{doc['command']}`; {doc['seconds']:.0f} s on {doc['machine']}; "
             "models: " + ("RANDOM-INIT stand-ins (numbers meaningless)." if doc["random"]
                           else "shipped tiny checkpoints."),
             "Calibration: data/text/calib.txt only; evaluation: data/text/eval.txt only. Defaults: "
             f"replacement `{doc['defaults']['replace']}`, router `{doc['defaults']['router']}`, "
             f"analog parts {doc['defaults']['parts']}.", "",
             "## Summary: ROMER vs noisy (paired per-seed reduction), paper for comparison", "",
             "| model | noise | clean | noisy | ROMER | reduction | paired (mean ± std) | wins | beyond spread? | "
             "gap recovered | digital router | paper |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in doc["tables"]:
        c = e["conditions"]
        r, n = c["romer"], c["noisy"]
        pm, ps = r["reduction_pct_paired"]
        beyond = "yes" if pm - 2 * ps / np.sqrt(len(r["ppl"])) > 0 and r["ppl_mean"] + r["ppl_std"] < n["ppl_mean"] \
            else ("paired only" if pm - 2 * ps / np.sqrt(len(r["ppl"])) > 0 else "no")
        lines.append(f"| {e['family_label']} | `{e['noise']}` | {c['clean']['ppl_mean']:.2f} | "
                     f"{n['ppl_mean']:.2f} ± {n['ppl_std']:.2f} | {r['ppl_mean']:.2f} ± {r['ppl_std']:.2f} | "
                     f"{r['reduction_pct']:+.1f} % | {pm:+.2f} ± {ps:.2f} % | {r['wins']}/{len(r['ppl'])} | {beyond} | "
                     f"{'n/a' if r['gap_recovered_pct'] is None else round(r['gap_recovered_pct'], 1)} % | "
                     f"{c['digital_router']['reduction_pct']:+.1f} % | {e['paper'][1]} % |")
    lines += ["", "'beyond spread?': yes = ROMER mean + its std below the noisy mean AND paired mean reduction more "
              "than 2 standard errors above 0; 'paired only' = only the paired test passes.", "",
              "## Tables", ""]
    for e in doc["tables"]:
        lines += fmt_table(e) + [""]
    if doc["ablations"]:
        lines += ["## Ablations (the measurements behind the defaults)", ""]
        for fam, a in doc["ablations"].items():
            lines += [f"### {fam}, noise `{a['noise']}`, seeds {a['seeds']}: clean {a['clean_ppl']:.3f}, "
                      f"noisy {a['noisy_mean']:.3f}", "", "| variant | perplexity | Δ vs noisy (paired) | load CV |",
                      "|---|---|---|---|"]
            for name, v in a["variants"].items():
                if "vs_clean_pct" in v:
                    d = f"{v['vs_clean_pct']:+.2f} % vs clean (no noise)"
                else:
                    d = f"{v['reduction_pct_mean']:+.2f} ± {v['reduction_pct_std']:.2f} %"
                lines.append(f"| {name} | {np.mean(v['ppl']):.3f} | {d} | {v['cv_mean']:.3f} |")
            lines.append("")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--noises", default="pcm@16,hermes@16,gaussian:0.4")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--calib-mode", default="per_seed", choices=["per_seed", "held_out"])
    ap.add_argument("--ablation-noise", default="pcm@16")
    ap.add_argument("--ablation-seeds", type=int, default=3)
    ap.add_argument("--ablation-eval-tokens", type=int, default=16384)
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--no-tables", action="store_true", help="ablations only")
    ap.add_argument("--random", action="store_true", help="random-init stand-ins when a checkpoint is missing")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--out", type=Path, default=REPO / "results")
    ap.add_argument("--merge", type=Path, nargs="*", default=None,
                    help="merge the tables of these directories' proof.json (parallel processes) into --out")
    ap.add_argument("--merge-ablations", type=Path, nargs="*", default=None,
                    help="take the ablations from these directories instead (default: the --merge ones)")
    args = ap.parse_args(argv)
    if args.merge:
        parts = [json.loads((d / "proof.json").read_text()) for d in args.merge]
        abl = [json.loads((d / "proof.json").read_text()) for d in (args.merge_ablations or args.merge)]
        renamed = {"replace average threshold 0.25 (m<=4, default)": "replace average threshold 0.25 (m<=4)",
                   "romer default, held-out instance": "romer threshold + reference_free, held-out instance"}
        for a in abl:  # names of an earlier version of variants(), same settings
            for v in a["ablations"].values():
                v["variants"] = {renamed.get(k, k): x for k, x in v["variants"].items()}
        doc = {**parts[0], "tables": [t for p in parts for t in p["tables"]],
               "ablations": {k: v for p in abl for k, v in p["ablations"].items()},
               "seconds": max(p.get("seconds", 0.0) for p in parts),
               "command": " ; ".join(p["command"] for p in parts + (abl if args.merge_ablations else []))
               + " (parallel processes, merged)",
               "random": any(p["random"] for p in parts)}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "proof.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        write_markdown(doc, args.out / "proof.md")
        print(f"merged {len(parts)} runs into {args.out / 'proof.json'} and {args.out / 'proof.md'}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_all:6.0f}s] {msg}", flush=True)

    defaults = CalibrateConfig(model="-")
    doc: dict[str, Any] = {
        "command": "python scripts/romer_proof.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "random": False, "defaults": {"replace": asdict(defaults.replace),
                                      "router": {**asdict(defaults.router), "quantiles": "0.05..0.95 step 0.05"},
                                      "parts": list(defaults.parts), "t_read": defaults.t_read,
                                      "drift_compensation": defaults.drift_compensation},
        "tables": [], "ablations": {}}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        d = REPO / "data" / "models" / name
        if not (d / "config.json").is_file():
            if not args.random:
                log(f"{name}: no checkpoint at {d}; skipped (use --random for stand-ins)")
                continue
            d = random_model_dir(name, args.out / "random_models")
            doc["random"] = True
        model, tok = load_model(d), load_tokenizer(d)
        label = f"{PAPER[name][0]}-style ({model_family(model)})"
        for noise in [] if args.no_tables else [n.strip() for n in args.noises.split(",") if n.strip()]:
            cfg = CalibrateConfig(model=d, noise=noise, calib_text=CALIB, eval_text=EVAL, seeds=args.seeds,
                                  calib_mode=args.calib_mode, calib_tokens=args.calib_tokens,
                                  eval_tokens=args.eval_tokens)
            log(f"{name} {noise}: table")
            res = calibrate(cfg, model=model, tokenizer=tok)
            entry = {"model": name, "family_label": label, "noise": noise, "paper": PAPER[name],
                     "n_eval_tokens": res.n_eval_tokens, "n_calib_tokens": res.n_calib_tokens, "seeds": args.seeds,
                     "calib_mode": res.calib_mode, "seconds": res.seconds, "timings": res.timings,
                     "noise_model": res.noise, "plan": res.plan,
                     "conditions": {k: cond_row(c) for k, c in res.conditions.items()}}
            doc["tables"].append(entry)
            c = res.conditions
            log(f"  clean {c['clean'].ppl_mean:.3f} noisy {c['noisy'].ppl_mean:.3f}±{c['noisy'].ppl_std:.3f} "
                f"replace {c['replace'].ppl_mean:.3f} router {c['router'].ppl_mean:.3f} "
                f"romer {c['romer'].ppl_mean:.3f}±{c['romer'].ppl_std:.3f} "
                f"digital {c['digital_router'].ppl_mean:.3f} ({res.seconds:.0f}s)")
            (args.out / "proof.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        if not args.no_ablations:
            cfg = CalibrateConfig(model=d, noise=args.ablation_noise, calib_text=CALIB, eval_text=EVAL,
                                  calib_tokens=args.calib_tokens, eval_tokens=args.ablation_eval_tokens)
            log(f"{name} {args.ablation_noise}: ablations")
            doc["ablations"][name] = run_ablations(cfg, model, tok, list(range(args.ablation_seeds)), log)
        doc["seconds"] = time.perf_counter() - t_all
        (args.out / "proof.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    doc["seconds"] = time.perf_counter() - t_all
    (args.out / "proof.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    write_markdown(doc, args.out / "proof.md")
    log(f"wrote {args.out / 'proof.json'} and {args.out / 'proof.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
