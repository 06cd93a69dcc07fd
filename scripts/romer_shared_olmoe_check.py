"""OLMoE (no shared expert): the new default ReplaceConfig() plans exactly what the previous one did.

    python scripts/romer_shared_olmoe_check.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

R = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(R))
from romer.adapters import load_model, load_tokenizer  # noqa: E402
from romer.calibrate import CalibrateConfig, CalibrationSession  # noqa: E402
from romer.perplexity import tokenize_file  # noqa: E402
from romer.replace import ReplaceConfig  # noqa: E402
from romer.router_calib import RouterCalibConfig  # noqa: E402

torch.set_num_threads(1)
CAL = R / 'data/text/calib.txt'
EV = R / 'data/text/eval.txt'
d = R/'data/models/olmoe-tiny'
model, tok = load_model(d), load_tokenizer(d)
cfg = CalibrateConfig(model=d, noise='pcm@16', calib_text=CAL, eval_text=EV, calib_tokens=8192, eval_tokens=16384)
s = CalibrationSession(cfg, model, tokenize_file(CAL, tok, 8192))
ev = tokenize_file(EV, tok, 16384)
out = {'noisy': [], 'new_default': [], 'previous_default': [], 'new_strategy': []}
for seed in range(3):
    out['noisy'].append(s.evaluate(ev, seed, None, None)[0])
    out['new_default'].append(s.variant(ev, seed, ReplaceConfig(), RouterCalibConfig())[0])
    out['previous_default'].append(s.variant(ev, seed, ReplaceConfig(shared_replicas=False), RouterCalibConfig())[0])
    out['new_strategy'].append(s.plan_on(seed).strategy)
    print(seed, {k: v[-1] for k, v in out.items()}, flush=True)
(R / 'results/shared_replicas/olmoe-tiny').mkdir(parents=True, exist_ok=True)
Path('/work/main/results/shared_replicas/olmoe-tiny/result.json').write_text(json.dumps(out, indent=2) + '\n')
