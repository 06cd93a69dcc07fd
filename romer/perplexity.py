"""Perplexity with the standard Hugging Face sliding-window recipe, batched, and over noise seeds.

Recipe (https://huggingface.co/docs/transformers/perplexity): windows of ``max_length``
tokens start every ``stride`` tokens; each window scores only the tokens not scored by the
previous one (its last ``trg_len`` tokens), with the rest as context. Every token except the
first of the text is scored exactly once, so the token count is exact (the HF snippet's
``num_valid - batch_size`` correction only holds for the first window). Windows are batched
(only the last one can be shorter; it is right-padded and masked).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from noise_fit.model import NoiseModel


@dataclass(frozen=True)
class WindowConfig:
    """Sliding-window settings (tokens)."""

    max_length: int = 512
    stride: int = 256
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.max_length < 2 or not 1 <= self.stride <= self.max_length or self.batch_size < 1:
            raise ValueError(f"need max_length >= 2, 1 <= stride <= max_length, batch_size >= 1; got {self}")


@dataclass
class PerplexityResult:
    """Perplexity = exp(nll / n_tokens)."""

    ppl: float
    nll: float  # summed negative log-likelihood (nats)
    n_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"ppl": self.ppl, "nll": self.nll, "n_tokens": self.n_tokens}


@dataclass
class MCResult:
    """Perplexity over noise seeds."""

    seeds: list[int]
    values: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else float("nan")

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"seeds": self.seeds, "values": self.values, "mean": self.mean, "std": self.std}


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, trg_len) of each window, exactly as the HF recipe walks the text."""
    out: list[tuple[int, int, int]] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return out


def perplexity(model: nn.Module, ids: torch.Tensor, cfg: WindowConfig | None = None,
               before_forward: Callable[[torch.Tensor | None], None] | None = None,
               progress: Callable[[int], None] | None = None) -> PerplexityResult:
    """Sliding-window perplexity of a 1-D token tensor.

    ``before_forward(attention_mask)`` is called before each batch (e.g. a RoutingRecorder's
    ``set_mask``); ``progress(n)`` after each batch with the number of windows done.
    """
    cfg = cfg or WindowConfig()
    ids = ids.reshape(-1).long()
    if ids.numel() < 2:
        raise ValueError("need at least 2 tokens for perplexity")
    wins = windows(ids.numel(), cfg.max_length, cfg.stride)
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(wins), cfg.batch_size):
            batch = wins[i:i + cfg.batch_size]
            lens = [e - b for b, e, _ in batch]
            width = max(lens)
            x = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for r, (b, e, _) in enumerate(batch):
                x[r, : e - b] = ids[b:e]
                mask[r, : e - b] = 1
            padded = bool((mask == 0).any())
            if before_forward is not None:
                before_forward(mask if padded else None)
            out = model(input_ids=x.to(device), attention_mask=mask.to(device) if padded else None)
            logits = out.logits if hasattr(out, "logits") else out[0]
            rows, pos = [], []
            for r, ((_, _, trg), n) in enumerate(zip(batch, lens, strict=True)):
                first = max(1, n - trg)  # positions scored in this window (predicted from pos - 1)
                pos.extend(range(first, n))
                rows.extend([r] * (n - first))
            rt, pt = torch.tensor(rows), torch.tensor(pos)
            pred = logits[rt.to(logits.device), (pt - 1).to(logits.device)].float()
            tgt = x[rt, pt].to(pred.device)
            nll += float(F.cross_entropy(pred, tgt, reduction="sum"))
            count += len(pos)
            if progress is not None:
                progress(min(i + cfg.batch_size, len(wins)))
    return PerplexityResult(ppl=math.exp(nll / count), nll=nll, n_tokens=count)


def tokenize_text(text: str, tokenizer: Any, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of a whole text (no special tokens added), cut to ``max_tokens``."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    t = torch.tensor(ids, dtype=torch.long)
    return t[:max_tokens] if max_tokens else t


def tokenize_file(path: str | Path, tokenizer: Any, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of a UTF-8 text file (joined as is, like WikiText-2's "\\n\\n".join)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {str(p)!r} does not exist")
    return tokenize_text(p.read_text(encoding="utf-8"), tokenizer, max_tokens)


def cached_dataset_text(name: str, config: str | None = None, split: str = "test", column: str = "text") -> str:
    """Text of a `datasets` dataset found in the local cache only (never downloads).

    Joined with "\\n\\n" as in the HF WikiText-2 recipe. Raises if `datasets` is not installed
    or the dataset is not cached.
    """
    import importlib.util
    import os

    if importlib.util.find_spec("datasets") is None:
        raise RuntimeError("the 'datasets' package is not installed; pass a text file instead")
    previous = os.environ.get("HF_DATASETS_OFFLINE")
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # before the import: datasets reads it then; only for this call
    try:
        import datasets

        cfg_mod = getattr(datasets, "config", None)
        old_flag = getattr(cfg_mod, "HF_DATASETS_OFFLINE", None)
        if cfg_mod is not None and old_flag is not None:
            cfg_mod.HF_DATASETS_OFFLINE = True  # already imported elsewhere: force offline anyway
        try:
            ds = datasets.load_dataset(name, config, split=split)
        finally:
            if cfg_mod is not None and old_flag is not None:
                cfg_mod.HF_DATASETS_OFFLINE = old_flag
    except Exception as e:  # noqa: BLE001 - any failure means "not in the local cache"
        raise RuntimeError(f"dataset {name!r} ({config}, {split}) is not in the local cache: {e}") from None
    finally:
        if previous is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)
        else:
            os.environ["HF_DATASETS_OFFLINE"] = previous
    return "\n\n".join(ds[column])


def perplexity_mc(model: nn.Module, ids: torch.Tensor, noise: NoiseModel, seeds: list[int],
                  inject_config: Any = None, cfg: WindowConfig | None = None) -> MCResult:
    """Perplexity under noise, one injection per seed (restored after each): mean and std."""
    from romer.inject import inject_noise

    res = MCResult(seeds=list(seeds))
    for s in seeds:
        with inject_noise(model, noise, inject_config, seed=s):
            res.values.append(perplexity(model, ids, cfg).ppl)
    return res
