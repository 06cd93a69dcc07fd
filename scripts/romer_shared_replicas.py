"""Experiment: shared-expert slices as averaged replicas in cold slots (ReplaceConfig(strategy="average_shared")).

Per seed (per_seed calibration on data/text/calib.txt, evaluation on data/text/eval.txt):
noisy; ROMER with the previous defaults (shared_replicas=False); replacement only with
average_shared (shared_copies replicas per slice, no gate); ROMER with average_shared (gate on)
+ auto router calibration. Paired per-seed reductions vs noisy and vs the previous default.

    python scripts/romer_shared_replicas.py --model qwen2moe-tiny --seeds 3 --out results/shared_replicas/qwen2moe-tiny
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from romer.adapters import load_model, load_tokenizer  # noqa: E402
from romer.calibrate import CalibrateConfig, CalibrationSession, _null  # noqa: E402
from romer.perplexity import tokenize_file  # noqa: E402
from romer.replace import ReplaceConfig, apply_replacement, shared_slices  # noqa: E402
from romer.router_calib import RouterCalibConfig  # noqa: E402

CALIB = REPO / "data" / "text" / "calib.txt"
EVAL = REPO / "data" / "text" / "eval.txt"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--noise", default="pcm@16")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    d = REPO / "data" / "models" / args.model
    model, tok = load_model(d), load_tokenizer(d)
    cfg = CalibrateConfig(model=d, noise=args.noise, calib_text=CALIB, eval_text=EVAL,
                          calib_tokens=args.calib_tokens, eval_tokens=args.eval_tokens)
    s = CalibrationSession(cfg, model, tokenize_file(CALIB, tok, args.calib_tokens))
    eval_ids = tokenize_file(EVAL, tok, args.eval_tokens)
    n = max([shared_slices(b) for b in s.blocks] + [0])
    m = max(1, n) * args.copies
    variants: dict[str, tuple[ReplaceConfig | None, RouterCalibConfig | None]] = {
        "romer default": (ReplaceConfig(shared_replicas=False), RouterCalibConfig()),  # the previous default
        f"replace average_shared m={m}, no gate": (
            ReplaceConfig(strategy="average_shared", select="bottom", m=m, shared_copies=args.copies, gate=False),
            None),
        f"romer average_shared m={m} + gate": (
            ReplaceConfig(strategy="average_shared", select="bottom", m=m, shared_copies=args.copies),
            RouterCalibConfig()),
    }
    doc: dict[str, Any] = {"command": "python scripts/romer_shared_replicas.py " + " ".join(sys.argv[1:]),
                           "model": args.model, "noise": args.noise, "n_slices": n, "seeds": args.seeds,
                           "noisy": [], "variants": {k: {"ppl": [], "kept": []} for k in variants}}
    for seed in range(args.seeds):
        noisy, _ = s.evaluate(eval_ids, seed, None, None)
        doc["noisy"].append(noisy)
        for name, (rep, rout) in variants.items():
            t0 = time.perf_counter()
            plan = s.plan_on(seed, rep) if rep is not None else None
            calib = None
            if rout is not None:
                with apply_replacement(s.model, plan, s.blocks) if plan else _null():
                    calib = s.router_on(seed, plan, rout)
            ppl, _ = s.evaluate(eval_ids, seed, plan, calib)
            v = doc["variants"][name]
            v["ppl"].append(ppl)
            v["kept"].append(plan.n_replaced if plan is not None else 0)
            print(f"[{time.perf_counter() - t_all:5.0f}s] seed {seed} {name}: {ppl:.3f} (noisy {noisy:.3f}, "
                  f"replaced {v['kept'][-1]}, {time.perf_counter() - t0:.0f}s)", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(doc, indent=2) + "\n")
    noisy = np.array(doc["noisy"])
    base = np.array(doc["variants"]["romer default"]["ppl"])
    for v in doc["variants"].values():
        p = np.array(v["ppl"])
        for key, ref in (("vs_noisy", noisy), ("vs_default", base)):
            red = 100 * (ref - p) / ref
            sd = float(red.std(ddof=1)) if red.size > 1 else 0.0
            v[key] = {"mean": float(red.mean()), "std": sd, "se": sd / np.sqrt(red.size), "per_seed": red.tolist()}
    doc["seconds"] = time.perf_counter() - t_all
    (args.out / "result.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: (round(float(np.mean(v["ppl"])), 3), v["vs_noisy"], v["vs_default"])
                      for k, v in doc["variants"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
