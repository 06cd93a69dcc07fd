"""`calibrate`: ROMER's two post-training steps on one model and noise model, with the ablation table.

The steps (library calls that tests and the proof script use directly):

1. `measure_load` runs calibration text through the NOISY model and counts expert selections
   (padding excluded); `plan_replacement` turns the counts into a replacement plan.
2. `apply_replacement` writes the copies into the CLEAN model (each replica slot then gets its
   own noise draw when the chip is programmed / noise is injected).
3. `clean_logit_quantiles` records the clean (replaced) model's router-logit quantiles on the
   calibration text; `fit_router_calibration` fits the affine maps on the noisy instance,
   layer by layer (layer l is fitted with layers < l already calibrated).

Calibration instances (``CalibrateConfig.calib_mode``), reported with every result:

- ``per_seed`` (default): calibrate on the evaluation seed's own noisy instance, using the
  calibration text: what the deployment loop does (calibrate on the weights the chip holds).
- ``held_out``: calibrate once on instance ``calib_seed`` (never an evaluation seed) and
  evaluate that calibration on the other instances (the statistics must transfer).

The evaluation text is tokenized only for evaluation; calibration sees calibration tokens only
(`calibrate` refuses the same file for both).

Conditions of the table: clean, noisy, replace (replacement only), router (router calibration
only), romer (both), digital_router (reference: the noisy model with a noise-free router).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from noise_fit.presets import resolve
from romer.adapters import MoEBlock, find_moe_blocks, load_model, load_tokenizer, model_family
from romer.calibrated import install_romer, save_calibrated
from romer.inject import InjectConfig, NoiseInjector
from romer.perplexity import WindowConfig, perplexity, tokenize_file
from romer.replace import (
    ReplaceConfig,
    ReplacementPlan,
    apply_replacement,
    physical_counts,
    plan_replacement,
    shared_slices,
)
from romer.router_calib import (
    LogitRecorder,
    RouterCalibConfig,
    RouterCalibration,
    fit_layer,
    logit_quantiles,
    subsample,
)
from romer.stats import LoadStats, RoutingRecorder

CONDITIONS = ("clean", "noisy", "replace", "router", "romer", "digital_router")
CALIB_MODES = ("per_seed", "held_out")
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class CalibrateConfig:
    """Model, chip noise, texts, and every ROMER choice (defaults documented in docs/romer.md)."""

    model: str | Path
    noise: str | Path = "pcm@16"
    calib_text: str | Path = "data/text/calib.txt"
    out: str | Path | None = None
    eval_text: str | Path | None = None
    seeds: int = 5
    seed0: int = 0
    calib_mode: str = "per_seed"
    calib_seed: int = 10_000  # instance of the saved calibration, and of every seed in held_out mode
    replace: ReplaceConfig = field(default_factory=ReplaceConfig)
    router: RouterCalibConfig = field(default_factory=RouterCalibConfig)
    parts: tuple[str, ...] = ("experts", "shared", "router")
    t_read: float = 3600.0
    drift_compensation: bool = True
    per_row: bool = False
    tile: tuple[int, int] | None = None
    workers: int = 1
    calib_tokens: int = 16384
    eval_tokens: int = 32768
    max_length: int = 256
    stride: int = 256
    batch_size: int = 16
    conditions: tuple[str, ...] = CONDITIONS
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.calib_mode not in CALIB_MODES:
            raise ValueError(f"calib_mode {self.calib_mode!r} unknown; expected one of {CALIB_MODES}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.seed0 <= self.calib_seed < self.seed0 + self.seeds:
            raise ValueError(f"calib_seed {self.calib_seed} must not be one of the evaluation seeds")
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad:
            raise ValueError(f"unknown condition(s) {bad}; expected some of {CONDITIONS}")
        if self.eval_text is not None and Path(self.eval_text).resolve() == Path(self.calib_text).resolve():
            raise ValueError("the calibration text must not be the evaluation text")


@dataclass
class ConditionResult:
    """One row of the table: perplexity over seeds, load, and the gain relative to noisy."""

    name: str
    ppl: list[float]
    cv: list[float]
    max_mean: list[float]
    ppl_mean: float = 0.0
    ppl_std: float = 0.0
    cv_mean: float = 0.0
    max_mean_mean: float = 0.0
    reduction_pct: float | None = None  # 100 (noisy - this) / noisy, of the means
    reduction_pct_paired: tuple[float, float] | None = None  # mean ± std of per-seed reductions
    gap_recovered_pct: float | None = None  # 100 (noisy - this) / (noisy - clean)
    wins: int | None = None  # seeds where this < noisy

    def finish(self) -> None:
        self.ppl_mean = float(np.mean(self.ppl))
        self.ppl_std = float(np.std(self.ppl, ddof=1)) if len(self.ppl) > 1 else 0.0
        self.cv_mean = float(np.mean(self.cv)) if self.cv else 0.0
        self.max_mean_mean = float(np.mean(self.max_mean)) if self.max_mean else 0.0


@dataclass
class CalibrateResult:
    """What `calibrate` did: the saved calibration, and (with an eval text) the table."""

    model: str
    family: str
    noise: dict[str, Any]
    config: dict[str, Any]
    calib_mode: str
    n_calib_tokens: int
    calib_text_sha256: str
    plan: dict[str, Any] | None
    router_calibration: dict[str, Any] | None
    n_eval_tokens: int = 0
    conditions: dict[str, ConditionResult] = field(default_factory=dict)
    out: str | None = None
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, default=str)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text


# ---------------------------------------------------------------- passes over calibration text

def token_batches(ids: torch.Tensor, max_length: int, batch_size: int
                  ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Non-overlapping windows, batched; the last batch is right-padded with a mask (None = no padding)."""
    ids = ids.reshape(-1).long()
    chunks = [ids[i:i + max_length] for i in range(0, ids.numel(), max_length)]
    chunks = [c for c in chunks if c.numel() >= 2]
    out: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    for i in range(0, len(chunks), batch_size):
        group = chunks[i:i + batch_size]
        width = max(c.numel() for c in group)
        x = torch.zeros(len(group), width, dtype=torch.long)
        m = torch.zeros(len(group), width, dtype=torch.long)
        for r, c in enumerate(group):
            x[r, : c.numel()] = c
            m[r, : c.numel()] = 1
        out.append((x, m if bool((m == 0).any()) else None))
    return out


def _run(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor | None]],
         set_mask: Callable[[torch.Tensor | None], None]) -> None:
    with torch.no_grad():
        for x, m in batches:
            set_mask(m)
            try:
                model(input_ids=x, attention_mask=m)
            except LogitRecorder.Stop:
                pass


def calib_nll(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor | None]]) -> float:
    """Mean next-token loss (nats) over the batches' real tokens: the selection criterion of the gates."""
    total, count = 0.0, 0
    with torch.no_grad():
        for x, m in batches:
            logits = model(input_ids=x, attention_mask=m).logits[:, :-1].float()
            tgt = x[:, 1:]
            keep = torch.ones_like(tgt, dtype=torch.bool) if m is None else (m[:, 1:] > 0)
            total += float(F.cross_entropy(logits[keep], tgt[keep], reduction="sum"))
            count += int(keep.sum())
    return total / max(count, 1)


def measure_load(model: nn.Module, blocks: list[MoEBlock], batches: list[tuple[torch.Tensor, torch.Tensor | None]]
                 ) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """Per-layer expert selection counts (and token counts) over the batches, padding excluded."""
    with RoutingRecorder(model, blocks, keep_indices=False) as rec:
        _run(model, batches, rec.set_mask)
    return rec.counts, rec.tokens


def clean_logit_quantiles(model: nn.Module, blocks: list[MoEBlock],
                          batches: list[tuple[torch.Tensor, torch.Tensor | None]], cfg: RouterCalibConfig,
                          plan: ReplacementPlan | None = None) -> dict[int, np.ndarray]:
    """[E, Q] router-logit quantiles of every layer of the CLEAN model (with the plan's routing)."""
    with install_romer(model, plan, None, blocks), LogitRecorder(blocks) as rec:
        _run(model, batches, rec.set_mask)
    return {layer: logit_quantiles(subsample(rec.cat(layer), cfg.max_tokens_per_expert), cfg)
            for layer in rec.logits}


def fit_router_calibration(model: nn.Module, blocks: list[MoEBlock],
                           batches: list[tuple[torch.Tensor, torch.Tensor | None]],
                           clean_q: dict[int, np.ndarray] | None, cfg: RouterCalibConfig,
                           plan: ReplacementPlan | None = None) -> RouterCalibration:
    """Fit the router maps on the model as it is now (noisy), against the clean quantiles."""
    if cfg.mode == "auto":
        best: RouterCalibration | None = None
        scores: dict[str, float] = {}
        for cand in cfg.candidates:
            c = fit_router_calibration(model, blocks, batches, clean_q, replace(cfg, mode=cand), plan)
            if cand in ("layer", "expert", "expert_keep_scale") and all(a.identity for a in c.layers.values()):
                c.config = {**c.config, "selected_by": "auto", "reason": "instance equals the clean reference"}
                return c  # a noise-free instance: the identity, never a reference-free reshuffle
            with install_romer(model, plan, c, blocks):
                scores[cand] = calib_nll(model, batches)
            if best is None or scores[cand] < min(v for k, v in scores.items() if k != cand):
                best = c
        assert best is not None
        best.config = {**best.config, "selected_by": "auto", "calib_nll": scores}
        return best
    calib = RouterCalibration(mode=cfg.mode, config={**asdict(cfg), "quantiles": list(cfg.quantiles)})

    def skip(layer: int) -> set[int]:
        lp = plan.layer(layer) if plan is not None else None
        return set(lp.cold) if lp is not None and plan is not None and plan.strategy != "copy" else set()

    def fit(layer: int, z: torch.Tensor) -> None:
        q = None if clean_q is None else clean_q.get(layer)
        calib.layers[layer] = fit_layer(layer, subsample(z, cfg.max_tokens_per_expert), q, cfg, skip(layer))

    if cfg.mode == "none":
        return calib
    if cfg.sequential:
        for b in blocks:
            with install_romer(model, plan, calib, blocks), LogitRecorder(blocks, {b.layer}, b.layer) as rec:
                _run(model, batches, rec.set_mask)
            fit(b.layer, rec.cat(b.layer))
    else:
        with install_romer(model, plan, None, blocks), LogitRecorder(blocks) as rec:
            _run(model, batches, rec.set_mask)
        for b in blocks:
            fit(b.layer, rec.cat(b.layer))
    return calib


# ---------------------------------------------------------------- the orchestration

class CalibrationSession:
    """A loaded model, its blocks, calibration batches and injectors: state shared by `calibrate` and sweeps."""

    def __init__(self, cfg: CalibrateConfig, model: nn.Module, calib_ids: torch.Tensor) -> None:
        self.cfg = cfg
        self.model = model
        self.blocks = find_moe_blocks(model)
        self.calib = token_batches(calib_ids, cfg.max_length, cfg.batch_size)
        self.noise = resolve(cfg.noise)
        icfg = dict(t_read=cfg.t_read, drift_compensation=cfg.drift_compensation, per_row=cfg.per_row,
                    tile=cfg.tile, workers=cfg.workers)
        self.injector = NoiseInjector(self.noise, InjectConfig(parts=cfg.parts, **icfg))
        digital = tuple(p for p in cfg.parts if p != "router") or ("experts",)
        self.digital_injector = NoiseInjector(self.noise, InjectConfig(parts=digital, **icfg))
        self._clean_q: dict[str, dict[int, np.ndarray]] = {}
        self.timings: dict[str, float] = {}

    def _time(self, key: str, t0: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0

    def clean_q(self, plan: ReplacementPlan | None, rcfg: RouterCalibConfig | None = None
                ) -> dict[int, np.ndarray] | None:
        rcfg = rcfg or self.cfg.router
        if rcfg.mode in ("none", "reference_free"):
            return None
        key = json.dumps([plan.to_dict() if plan else None, list(rcfg.quantiles)], sort_keys=True)
        if key not in self._clean_q:
            t0 = time.perf_counter()
            self._clean_q[key] = clean_logit_quantiles(self.model, self.blocks, self.calib, rcfg, plan)
            self._time("clean_quantiles", t0)
        return self._clean_q[key]

    def plan_on(self, seed: int | None, replace: ReplaceConfig | None = None) -> ReplacementPlan:
        """Replacement plan from the load of noisy instance ``seed`` (None: clean) on calibration text."""
        t0 = time.perf_counter()
        with self.injector.inject(self.model, seed) if seed is not None else _null():
            counts, tokens = measure_load(self.model, self.blocks, self.calib)
        replace_cfg = replace_or(replace, self.cfg.replace)
        plan = plan_replacement(counts, tokens, {b.layer: b.top_k for b in self.blocks}, replace_cfg,
                                n_slices={b.layer: shared_slices(b) for b in self.blocks})
        if replace_cfg.gate and seed is not None and plan.n_replaced:
            with self.injector.inject(self.model, seed):
                base = calib_nll(self.model, self.calib)
            with apply_replacement(self.model, plan, self.blocks), self.injector.inject(self.model, seed), \
                    install_romer(self.model, plan, None, self.blocks):
                with_plan = calib_nll(self.model, self.calib)
            plan.config = {**plan.config, "gate_calib_nll": {"without": base, "with": with_plan}}
            if with_plan >= base:
                plan = ReplacementPlan(strategy=plan.strategy, layers=[], config={**plan.config, "gated_off": True})
        self._time("load_and_plan", t0)
        return plan

    def router_on(self, seed: int | None, plan: ReplacementPlan | None, rcfg: RouterCalibConfig | None = None
                  ) -> RouterCalibration:
        """Router calibration fitted on noisy instance ``seed`` (None: clean; model already replaced by ``plan``)."""
        rcfg = rcfg or self.cfg.router
        clean_q = self.clean_q(plan, rcfg)
        t0 = time.perf_counter()
        with self.injector.inject(self.model, seed) if seed is not None else _null():
            calib = fit_router_calibration(self.model, self.blocks, self.calib, clean_q, rcfg, plan)
        self._time("router_fit", t0)
        return calib

    def fit(self, seed: int, replace: bool, router: bool) -> tuple[ReplacementPlan | None, RouterCalibration | None]:
        """Plan and/or router calibration on instance ``seed``; leaves the model clean and NOT replaced."""
        plan = self.plan_on(seed) if replace else None
        calib = None
        if router:
            with apply_replacement(self.model, plan, self.blocks) if plan else _null():
                calib = self.router_on(seed, plan)
        return plan, calib

    def evaluate(self, ids: torch.Tensor, seed: int | None, plan: ReplacementPlan | None,
                 calib: RouterCalibration | None, digital_router: bool = False) -> tuple[float, LoadStats]:
        """Perplexity and physical load of (replaced) model under instance ``seed`` (None = clean)."""
        t0 = time.perf_counter()
        wcfg = WindowConfig(self.cfg.max_length, self.cfg.stride, self.cfg.batch_size)
        injector = self.digital_injector if digital_router else self.injector
        with apply_replacement(self.model, plan, self.blocks) if plan else _null(), \
                injector.inject(self.model, seed) if seed is not None else _null(), \
                install_romer(self.model, plan, calib, self.blocks), \
                RoutingRecorder(self.model, self.blocks, keep_indices=False) as rec:
            ppl = perplexity(self.model, ids, wcfg, rec.set_mask).ppl
        counts = {layer: physical_counts(c, plan.layer(layer) if plan else None, plan.strategy if plan else "")
                  for layer, c in rec.counts.items()}
        self._time("evaluate", t0)
        return ppl, LoadStats.from_counts(counts, rec.tokens)


    def variant(self, eval_ids: torch.Tensor, seed: int | None, replace: ReplaceConfig | None,
                router: RouterCalibConfig | None, calib_seed: int | None = None) -> tuple[float, LoadStats]:
        """One ablation variant on instance ``seed`` (None: clean), calibrated on ``calib_seed`` (default: seed)."""
        cs = seed if calib_seed is None else calib_seed
        plan = self.plan_on(cs, replace) if replace is not None and replace.m > 0 else None
        calib = None
        if router is not None and router.mode != "none":
            with apply_replacement(self.model, plan, self.blocks) if plan else _null():
                calib = self.router_on(cs, plan, router)
        return self.evaluate(eval_ids, seed, plan, calib)


def replace_or(given: ReplaceConfig | None, default: ReplaceConfig) -> ReplaceConfig:
    return default if given is None else given


class _null:
    """A do-nothing context manager (keeps the `with` chains readable)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def summarise(conds: dict[str, ConditionResult]) -> None:
    """Fill means, reductions vs noisy, share of the noise gap recovered, paired per-seed gains."""
    for c in conds.values():
        c.finish()
    noisy, clean = conds.get("noisy"), conds.get("clean")
    if noisy is None:
        return
    for c in conds.values():
        if c.name in ("noisy", "clean"):
            continue
        c.reduction_pct = 100.0 * (noisy.ppl_mean - c.ppl_mean) / noisy.ppl_mean
        per = [100.0 * (n - x) / n for n, x in zip(noisy.ppl, c.ppl, strict=True)]
        c.reduction_pct_paired = (float(np.mean(per)), float(np.std(per, ddof=1)) if len(per) > 1 else 0.0)
        c.wins = int(sum(x < n for n, x in zip(noisy.ppl, c.ppl, strict=True)))
        if clean is not None and noisy.ppl_mean > clean.ppl_mean:
            c.gap_recovered_pct = 100.0 * (noisy.ppl_mean - c.ppl_mean) / (noisy.ppl_mean - clean.ppl_mean)


def calibrate(cfg: CalibrateConfig, progress: Progress | None = None, model: nn.Module | None = None,
              tokenizer: Any = None) -> CalibrateResult:
    """Fit ROMER on instance ``calib_seed`` (saved to ``cfg.out``), and with an eval text the ablation table.

    ``model``/``tokenizer`` may be passed to reuse loaded objects (tests, sweeps); the model
    is left clean and unhooked.
    """
    t_all = time.perf_counter()
    if model is None:
        model = load_model(cfg.model, dtype=getattr(torch, cfg.dtype))
    if getattr(model, "romer_hooks", None) is not None:
        raise ValueError(f"{cfg.model}: already a calibrated model; calibrate the original checkpoint")
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model)
    family = model_family(model)
    calib_ids = tokenize_file(cfg.calib_text, tokenizer, cfg.calib_tokens)
    if calib_ids.numel() < 2:
        raise ValueError("the calibration text gives fewer than 2 tokens")
    s = CalibrationSession(cfg, model, calib_ids)
    use_replace = cfg.replace.m > 0
    use_router = cfg.router.mode != "none"

    def tick(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(stage, done, total)

    # The saved calibration: fitted on instance calib_seed (the chip as programmed and measured).
    tick("calibrate", 0, 1)
    plan, calib = s.fit(cfg.calib_seed, use_replace, use_router)
    tick("calibrate", 1, 1)
    conf = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    result = CalibrateResult(
        model=str(cfg.model), family=family, noise=s.noise.to_dict(), config=conf, calib_mode=cfg.calib_mode,
        n_calib_tokens=int(calib_ids.numel()), calib_text_sha256=_sha256(cfg.calib_text),
        plan=plan.to_dict() if plan else None, router_calibration=calib.to_dict() if calib else None)

    if cfg.eval_text is not None:
        eval_ids = tokenize_file(cfg.eval_text, tokenizer, cfg.eval_tokens)
        if eval_ids.numel() < 2:
            raise ValueError("the evaluation text gives fewer than 2 tokens")
        result.n_eval_tokens = int(eval_ids.numel())
        result.conditions = run_table(s, eval_ids, (plan, calib), tick)

    if cfg.out is not None:
        metrics = {k: {"ppl_mean": c.ppl_mean, "ppl_std": c.ppl_std, "cv": c.cv_mean, "max_mean": c.max_mean_mean,
                       "reduction_pct": c.reduction_pct, "gap_recovered_pct": c.gap_recovered_pct}
                   for k, c in result.conditions.items()}
        with apply_replacement(model, plan, s.blocks) if plan else _null():
            out = save_calibrated(model, tokenizer, cfg.out, plan, calib, s.noise.to_dict(), metrics, extra={
                "source_model": str(cfg.model), "family": family, "calib_seed": cfg.calib_seed,
                "calib_mode": cfg.calib_mode, "calib_text_sha256": result.calib_text_sha256,
                "n_calib_tokens": result.n_calib_tokens, "analog_parts": list(cfg.parts), "t_read": cfg.t_read,
                "drift_compensation": cfg.drift_compensation})
        result.out = str(out)
    result.timings = {k: round(v, 3) for k, v in s.timings.items()}
    result.seconds = time.perf_counter() - t_all
    return result


def run_table(s: CalibrationSession, eval_ids: torch.Tensor,
              held: tuple[ReplacementPlan | None, RouterCalibration | None],
              tick: Callable[[str, int, int], None]) -> dict[str, ConditionResult]:
    """Every condition of ``s.cfg.conditions`` over the evaluation seeds."""
    cfg = s.cfg
    want = set(cfg.conditions) | {"noisy"}
    conds = {name: ConditionResult(name, [], [], []) for name in CONDITIONS if name in want}
    if "clean" in conds:
        ppl, load = s.evaluate(eval_ids, None, None, None)
        conds["clean"].ppl, conds["clean"].cv, conds["clean"].max_mean = [ppl], [load.cv], [load.max_mean]
    seeds = list(range(cfg.seed0, cfg.seed0 + cfg.seeds))
    held_router = None
    if cfg.calib_mode == "held_out" and "router" in conds:
        held_router = s.fit(cfg.calib_seed, False, True)[1]  # router-only calibration of the held-out instance
    for k, seed in enumerate(seeds):
        tick("seeds", k, len(seeds))

        def add(name: str, ppl: float, load: LoadStats) -> None:
            conds[name].ppl.append(ppl)
            conds[name].cv.append(load.cv)
            conds[name].max_mean.append(load.max_mean)

        add("noisy", *s.evaluate(eval_ids, seed, None, None))
        if "digital_router" in conds:
            add("digital_router", *s.evaluate(eval_ids, seed, None, None, digital_router=True))
        if cfg.calib_mode == "held_out":
            plan, calib = held
            router_only = held_router
        else:
            plan = s.plan_on(seed) if {"replace", "romer"} & conds.keys() else None
            calib = None
            if "romer" in conds:
                with apply_replacement(s.model, plan, s.blocks) if plan else _null():
                    calib = s.router_on(seed, plan)
            router_only = s.router_on(seed, None) if "router" in conds else None
        if "replace" in conds:
            add("replace", *s.evaluate(eval_ids, seed, plan, None))
        if "router" in conds:
            add("router", *s.evaluate(eval_ids, seed, None, router_only))
        if "romer" in conds:
            add("romer", *s.evaluate(eval_ids, seed, plan, calib))
    tick("seeds", len(seeds), len(seeds))
    summarise(conds)
    return conds
