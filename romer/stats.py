"""Expert load statistics from the routers' own decisions, and routing overlap clean vs noisy.

`RoutingRecorder` puts a forward hook on every router (``mlp.gate``, which in transformers
5.x returns ``(logits, top-k weights, top-k indices)`` on flattened tokens [B*T, H]) and
keeps the top-k indices of the tokens that are not padding. The hook returns None: a forward
hook that returns a value replaces the module's output.

Metrics per layer (FINDINGS.md: CV and max/mean move with noise, entropy barely does):
token counts per expert (a token routed to k experts counts once for each), coefficient of
variation std/mean, max/mean, min/mean, normalised entropy H(p)/ln E of the load shares, and
top-k set overlap |S_clean ∩ S_noisy| / k averaged over tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from romer.adapters import MoEBlock, find_moe_blocks


@dataclass
class LayerLoad:
    """Load statistics of one MoE layer."""

    layer: int
    counts: list[int]
    tokens: int
    cv: float
    max_mean: float
    min_mean: float
    entropy: float  # normalised to [0, 1]

    @classmethod
    def from_counts(cls, layer: int, counts: np.ndarray, tokens: int) -> LayerLoad:
        c = np.asarray(counts, dtype=np.float64)
        mean = c.mean() if c.size else 0.0
        if mean > 0:
            p = c / c.sum()
            nz = p[p > 0]
            ent = float(-(nz * np.log(nz)).sum() / np.log(c.size)) if c.size > 1 else 1.0
            cv, mx, mn = float(c.std() / mean), float(c.max() / mean), float(c.min() / mean)
        else:
            ent, cv, mx, mn = 0.0, 0.0, 0.0, 0.0
        return cls(layer=layer, counts=[int(v) for v in c], tokens=int(tokens), cv=cv, max_mean=mx,
                   min_mean=mn, entropy=ent)


@dataclass
class LoadStats:
    """Per-layer load statistics plus their means over layers."""

    layers: list[LayerLoad]
    cv: float = 0.0
    max_mean: float = 0.0
    min_mean: float = 0.0
    entropy: float = 0.0

    def __post_init__(self) -> None:
        if self.layers:
            self.cv = float(np.mean([x.cv for x in self.layers]))
            self.max_mean = float(np.mean([x.max_mean for x in self.layers]))
            self.min_mean = float(np.mean([x.min_mean for x in self.layers]))
            self.entropy = float(np.mean([x.entropy for x in self.layers]))

    @classmethod
    def from_counts(cls, counts: dict[int, np.ndarray], tokens: dict[int, int]) -> LoadStats:
        return cls([LayerLoad.from_counts(i, counts[i], tokens[i]) for i in sorted(counts)])

    def counts_matrix(self) -> np.ndarray:
        """[layers, experts] token counts."""
        return np.array([x.counts for x in self.layers], dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Overlap:
    """Top-k set overlap between two recordings of the same tokens (1 = identical routing)."""

    per_layer: dict[int, float] = field(default_factory=dict)
    mean: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"per_layer": {str(k): v for k, v in self.per_layer.items()}, "mean": self.mean}


class RoutingRecorder:
    """Forward hooks on all routers that record top-k indices of non-padding tokens.

    Use as a context manager; call `set_mask(attention_mask)` before each forward that has
    padding (or pass it to `run`). Recordings are kept in call order, so two recorders that saw
    the same batches can be compared token by token with `overlap`.
    """

    def __init__(self, model: nn.Module, blocks: list[MoEBlock] | None = None, keep_indices: bool = True) -> None:
        self.model = model
        self.blocks = blocks if blocks is not None else find_moe_blocks(model)
        self.keep_indices = keep_indices
        self._mask: torch.Tensor | None = None
        self._handles: list[Any] = []
        self.counts: dict[int, np.ndarray] = {b.layer: np.zeros(b.num_experts, dtype=np.int64) for b in self.blocks}
        self.tokens: dict[int, int] = {b.layer: 0 for b in self.blocks}
        self.indices: dict[int, list[torch.Tensor]] = {b.layer: [] for b in self.blocks}

    def set_mask(self, attention_mask: torch.Tensor | None) -> None:
        """Padding mask [B, T] (1 = real token) of the next forward; None = no padding."""
        self._mask = None if attention_mask is None else attention_mask.reshape(-1).bool()

    def _hook(self, block: MoEBlock) -> Any:
        n_exp = block.num_experts

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            idx = output[2].detach()
            idx = idx.reshape(-1, idx.shape[-1])
            if self._mask is not None:
                if self._mask.numel() != idx.shape[0]:
                    raise RuntimeError(f"layer {block.layer}: mask has {self._mask.numel()} tokens, "
                                       f"router saw {idx.shape[0]}")
                idx = idx[self._mask]
            self.counts[block.layer] += torch.bincount(idx.reshape(-1), minlength=n_exp).numpy()
            self.tokens[block.layer] += int(idx.shape[0])
            if self.keep_indices:
                self.indices[block.layer].append(idx.to(torch.int16 if n_exp < 32768 else torch.int32))
            return None  # never replace the router output

        return hook

    def __enter__(self) -> RoutingRecorder:
        self.attach()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def attach(self) -> None:
        if not self._handles:
            self._handles = [b.router.register_forward_hook(self._hook(b)) for b in self.blocks]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        """One no-grad forward with the mask set; returns the model output."""
        self.set_mask(attention_mask)
        with torch.no_grad():
            return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def stats(self) -> LoadStats:
        return LoadStats.from_counts(self.counts, self.tokens)

    def topk(self, layer: int) -> torch.Tensor:
        """All recorded top-k index rows of a layer [tokens, k]."""
        chunks = self.indices[layer]
        return torch.cat(chunks) if chunks else torch.empty(0, 0, dtype=torch.int16)


def topk_overlap_sets(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over tokens of |A ∩ B| / k for top-k index rows [N, k] (order within a row ignored)."""
    if a.shape != b.shape:
        raise ValueError(f"top-k recordings differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 1.0
    hits = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1)
    return float(hits.double().mean() / a.shape[-1])


def overlap(clean: RoutingRecorder, noisy: RoutingRecorder) -> Overlap:
    """Per-layer top-k overlap of two recorders that saw the same tokens in the same order."""
    per = {layer: topk_overlap_sets(clean.topk(layer), noisy.topk(layer)) for layer in clean.indices}
    return Overlap(per_layer=per, mean=float(np.mean(list(per.values()))) if per else 1.0)


def plot_load_heatmap(stats: LoadStats, path: str | Path, title: str = "expert load (share of mean)") -> Path:
    """Heatmap PNG of per-layer per-expert load, each layer normalised by its mean load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = stats.counts_matrix().astype(np.float64)
    mean = m.mean(axis=1, keepdims=True)
    rel = np.divide(m, mean, out=np.zeros_like(m), where=mean > 0)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.18 * m.shape[1] + 2), max(2.5, 0.3 * m.shape[0] + 1.5)))
    im = ax.imshow(rel, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(stats.layers)), [str(x.layer) for x in stats.layers])
    ax.set_title(f"{title}; mean CV {stats.cv:.3f}")
    fig.colorbar(im, ax=ax, label="load / mean")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
