"""`evaluate`: clean vs noisy perplexity and expert-load statistics (the library call behind `hil eval`).

One clean pass records the reference routing; each noise seed injects noise in place, runs
the same windows with the same hooks, compares routing with the clean pass, and restores the
clean weights. Results are JSON-serialisable.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noise_fit.presets import resolve
from romer.adapters import find_moe_blocks, load_model, load_tokenizer, model_family
from romer.inject import InjectConfig, NoiseInjector
from romer.perplexity import (
    WindowConfig,
    cached_dataset_text,
    perplexity,
    tokenize_file,
    tokenize_text,
    windows,
)
from romer.stats import LoadStats, RoutingRecorder, overlap, plot_load_heatmap

Progress = Callable[[str, int, int], None]  # (stage, windows done, windows total)


@dataclass
class EvalConfig:
    """What to evaluate: a local model, a noise spec (preset or noise.json), text, seeds."""

    model: str | Path
    noise: str | Path = "pcm"
    text: str | Path | None = None
    dataset: str | None = None  # "name[:config[:split]]" from the local `datasets` cache only
    seeds: int = 3
    seed0: int = 0
    max_length: int = 512
    stride: int = 256
    batch_size: int = 4
    max_tokens: int | None = 32768
    parts: tuple[str, ...] = ("experts",)
    t_read: float = 3600.0
    drift_compensation: bool = True
    per_row: bool = False
    tile: tuple[int, int] | None = None
    workers: int = 1
    heatmap: str | Path | None = None  # PNG prefix: <prefix>_clean.png, <prefix>_noisy.png (first seed)
    dtype: str = "float32"  # "bfloat16" halves memory (a 7B model needs it, with backup="disk")
    backup: str = "memory"  # clean-weight backup during injection: "memory" or "disk"

    def __post_init__(self) -> None:
        if (self.text is None) == (self.dataset is None):
            raise ValueError("give exactly one of a text file or a cached dataset name")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")


@dataclass
class SeedResult:
    """One noise seed: perplexity, load statistics and routing overlap with the clean model."""

    seed: int
    ppl: float
    load: LoadStats
    overlap: float
    overlap_per_layer: dict[str, float]
    inject_seconds: float


@dataclass
class EvalResult:
    """Clean vs noisy; ``noisy_*`` fields are mean and std over seeds."""

    model: str
    family: str
    noise: dict[str, Any]
    config: dict[str, Any]
    n_tokens: int
    clean_ppl: float
    clean_load: LoadStats
    noisy_ppl_mean: float
    noisy_ppl_std: float
    noisy_cv_mean: float
    noisy_max_mean_mean: float
    overlap_mean: float
    overlap_std: float
    seeds: list[SeedResult] = field(default_factory=list)
    seconds: float = 0.0
    tokens_per_s_clean: float = 0.0
    tokens_per_s_noisy: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, default=str)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text


def _token_ids(cfg: EvalConfig, tokenizer: Any) -> torch.Tensor:
    if cfg.text is not None:
        ids = tokenize_file(cfg.text, tokenizer, cfg.max_tokens)
    else:
        name, _, rest = str(cfg.dataset).partition(":")
        config, _, split = rest.partition(":")
        ids = tokenize_text(cached_dataset_text(name, config or None, split or "test"), tokenizer, cfg.max_tokens)
    if ids.numel() < 2:
        raise ValueError("the text gives fewer than 2 tokens")
    return ids


def evaluate(cfg: EvalConfig, progress: Progress | None = None, model: Any = None,
             tokenizer: Any = None) -> EvalResult:
    """Clean and noisy perplexity (mean ± std over seeds), load CV, max/mean and top-k overlap.

    ``model``/``tokenizer`` may be passed to reuse already-loaded objects (tests, sweeps).
    """
    t_all = time.perf_counter()
    noise = resolve(cfg.noise)
    if model is None:
        dtype = getattr(torch, cfg.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype {cfg.dtype!r} is not a torch dtype (float32, bfloat16, float16)")
        model = load_model(cfg.model, dtype=dtype)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model)
    family = model_family(model)
    blocks = find_moe_blocks(model)
    ids = _token_ids(cfg, tokenizer)
    wcfg = WindowConfig(cfg.max_length, cfg.stride, cfg.batch_size)
    n_windows = len(windows(ids.numel(), cfg.max_length, cfg.stride))
    injector = NoiseInjector(noise, InjectConfig(parts=cfg.parts, t_read=cfg.t_read,
                                                 drift_compensation=cfg.drift_compensation, per_row=cfg.per_row,
                                                 tile=cfg.tile, workers=cfg.workers, backup=cfg.backup))

    def prog(stage: str) -> Callable[[int], None] | None:
        return None if progress is None else (lambda n: progress(stage, n, n_windows))

    t0 = time.perf_counter()
    with RoutingRecorder(model, blocks) as clean_rec:
        clean = perplexity(model, ids, wcfg, clean_rec.set_mask, prog("clean"))
    t_clean = time.perf_counter() - t0
    clean_load = clean_rec.stats()
    if cfg.heatmap:
        plot_load_heatmap(clean_load, f"{cfg.heatmap}_clean.png", title="clean expert load")

    seeds: list[SeedResult] = []
    t_noisy = 0.0
    for k in range(cfg.seeds):
        seed = cfg.seed0 + k
        with injector.inject(model, seed) as handle:
            t0 = time.perf_counter()
            with RoutingRecorder(model, blocks) as rec:
                res = perplexity(model, ids, wcfg, rec.set_mask, prog(f"seed {seed}"))
            t_noisy += time.perf_counter() - t0
        ov = overlap(clean_rec, rec)
        load = rec.stats()
        if cfg.heatmap and k == 0:
            plot_load_heatmap(load, f"{cfg.heatmap}_noisy.png", title=f"noisy expert load (seed {seed})")
        seeds.append(SeedResult(seed=seed, ppl=res.ppl, load=load, overlap=ov.mean,
                                overlap_per_layer={str(a): b for a, b in ov.per_layer.items()},
                                inject_seconds=handle.seconds))
        del rec

    ppl = np.array([s.ppl for s in seeds])
    ovs = np.array([s.overlap for s in seeds])
    conf = asdict(cfg)
    conf = {k: (str(v) if isinstance(v, Path) else v) for k, v in conf.items()}
    return EvalResult(
        model=str(cfg.model), family=family, noise=noise.to_dict(), config=conf,
        n_tokens=clean.n_tokens, clean_ppl=clean.ppl, clean_load=clean_load,
        noisy_ppl_mean=float(ppl.mean()), noisy_ppl_std=float(ppl.std(ddof=1)) if len(ppl) > 1 else 0.0,
        noisy_cv_mean=float(np.mean([s.load.cv for s in seeds])),
        noisy_max_mean_mean=float(np.mean([s.load.max_mean for s in seeds])),
        overlap_mean=float(ovs.mean()), overlap_std=float(ovs.std(ddof=1)) if len(ovs) > 1 else 0.0,
        seeds=seeds, seconds=time.perf_counter() - t_all,
        tokens_per_s_clean=clean.n_tokens / t_clean if t_clean > 0 else 0.0,
        tokens_per_s_noisy=clean.n_tokens * len(seeds) / t_noisy if t_noisy > 0 else 0.0,
    )
