"""Router calibration: percentile-based affine maps on router logits, applied before top-k.

Why: analog noise on the router (and on everything upstream of it) shifts and rescales the
router logits, so the clean-trained routing is no longer what the noisy model computes. On
calibration text we know the clean weights, so the noisy logits' percentiles can be mapped
back onto the clean model's.

Modes (`RouterCalibConfig.mode`):

- ``layer`` (default): one affine map z' = a z + b per layer, least squares over all
  experts' matched quantiles (noisy vs clean). FINDINGS: it matched or beat per-expert maps;
  the gain comes from restoring the router's overall logit scale (b cancels in softmax).
- ``expert``: one affine map per expert, least squares on that expert's matched quantiles.
- ``expert_keep_scale``: the per-expert maps, divided by their mean slope so that the layer's
  overall (noisy) logit scale is kept: only the experts' relative offsets and spreads are
  restored (the ablations showed that shrinking noisy logits back to the clean scale hurts).
- ``reference_free``: no clean reference: per expert, centre on the median and divide by the
  inter-percentile range (q_hi - q_lo), then multiply by the layer's mean range so the overall
  logit scale is kept (FINDINGS: without that the clean model lost 15-45 %).
- ``none``: identity.
- ``auto`` (default): fit every mode of ``candidates`` on the instance and keep the one with the
  lowest next-token loss on the calibration text (``none`` included, so calibration never makes
  the calibration text worse). The ablations showed the best mode differs by family (per-expert
  maps for OLMoE, reference-free for the shared-expert models); the chip instance decides.

When the noisy logits' quantiles equal the clean ones (a noise-free model calibrated on
itself) the fit is snapped to the exact identity, so routing is bit-for-bit unchanged.
Padding tokens are excluded from the quantiles (attention mask, as in `romer.stats`).

`route` recomputes top-k exactly as the supported routers do in transformers 5.x
(``mlp.gate`` returns (logits, top-k weights, top-k indices)): softmax in float32 over all
experts, top-k, optional renormalisation (``norm_topk_prob``), weights cast back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from romer.adapters import MoEBlock

MODES = ("auto", "layer", "expert", "expert_keep_scale", "reference_free", "none")
AUTO_CANDIDATES: tuple[str, ...] = ("none", "layer", "expert", "expert_keep_scale", "reference_free")
DEFAULT_QUANTILES: tuple[float, ...] = tuple(float(q) for q in np.round(np.linspace(0.05, 0.95, 19), 4))


@dataclass(frozen=True)
class RouterCalibConfig:
    """How router logits are calibrated."""

    mode: str = "auto"
    candidates: tuple[str, ...] = AUTO_CANDIDATES  # modes tried by "auto"
    quantiles: tuple[float, ...] = DEFAULT_QUANTILES
    ipr: tuple[float, float] = (0.05, 0.95)  # inter-percentile range of ``reference_free``
    sequential: bool = True  # fit layer l with layers < l already calibrated (their outputs feed layer l)
    max_tokens_per_expert: int = 200_000  # cap for quantile memory (subsampled deterministically)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"router calibration mode {self.mode!r} unknown; expected one of {MODES}")
        if any(c not in MODES or c == "auto" for c in self.candidates) or not self.candidates:
            raise ValueError(f"auto candidates must be modes other than 'auto', got {self.candidates}")
        if not self.quantiles or any(not 0.0 <= q <= 1.0 for q in self.quantiles):
            raise ValueError("quantiles must be a non-empty list in [0, 1]")


@dataclass
class LayerAffine:
    """z' = scale * z + shift per expert (length-E lists; a per-layer map repeats one value)."""

    layer: int
    scale: list[float]
    shift: list[float]

    @property
    def identity(self) -> bool:
        return all(a == 1.0 for a in self.scale) and all(b == 0.0 for b in self.shift)


@dataclass
class RouterCalibration:
    """Fitted maps of all layers; JSON round trip via to_dict/from_dict."""

    mode: str
    layers: dict[int, LayerAffine] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "config": self.config,
                "layers": [{"layer": a.layer, "scale": a.scale, "shift": a.shift} for a in self.layers.values()]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RouterCalibration:
        layers = {int(x["layer"]): LayerAffine(int(x["layer"]), list(x["scale"]), list(x["shift"]))
                  for x in d.get("layers", [])}
        return cls(mode=d["mode"], layers=layers, config=dict(d.get("config", {})))


def check_routable(block: MoEBlock) -> None:
    """Raise if `route` cannot reproduce this block's router (sigmoid scoring, group-limited top-k)."""
    if block.scoring != "softmax" or block.n_group > 1 or block.router_bias is not None:
        raise NotImplementedError(
            f"layer {block.layer} ({block.family}): router recalibration supports softmax top-k routers "
            "(OLMoE, Qwen2/3-MoE, Mixtral, DeepSeek-MoE v1); sigmoid/grouped routing is not implemented")


def route(logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k weights and indices from logits, as OlmoeTopKRouter / Qwen2MoeTopKRouter compute them."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    top_v, top_i = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        top_v = top_v / top_v.sum(dim=-1, keepdim=True)
    return top_v.to(logits.dtype), top_i


def _quantiles(x: torch.Tensor, qs: tuple[float, ...]) -> np.ndarray:
    """[E, Q] quantiles of each column of x [N, E] (float64)."""
    if x.shape[0] == 0:
        raise ValueError("no (non-padding) tokens to take router-logit quantiles from")
    q = torch.tensor(qs, dtype=torch.float64)
    return torch.quantile(x.double(), q, dim=0).T.numpy()


def logit_quantiles(logits: torch.Tensor, cfg: RouterCalibConfig) -> np.ndarray:
    """[E, Q] quantiles of router logits [N, E] at ``cfg.quantiles``."""
    return _quantiles(logits, cfg.quantiles)


def _lsq(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares y ~ a x + b; identity snapped when x == y; shift only when x is constant."""
    if np.array_equal(x, y):
        return 1.0, 0.0
    vx = float(np.var(x))
    if vx <= 1e-12 * max(1.0, float(np.mean(x * x))):
        return 1.0, float(np.mean(y) - np.mean(x))
    a = float(np.mean((x - x.mean()) * (y - y.mean())) / vx)
    return a, float(y.mean() - a * x.mean())


def fit_layer(layer: int, noisy_logits: torch.Tensor, clean_q: np.ndarray | None, cfg: RouterCalibConfig,
              skip: set[int] | None = None) -> LayerAffine:
    """Fit one layer's map from its noisy logits [N, E] and the clean model's quantiles [E, Q].

    ``skip``: expert slots left at identity and out of the fit (masked, never selected).
    """
    n_exp = noisy_logits.shape[1]
    skip = skip or set()
    keep = [e for e in range(n_exp) if e not in skip]
    scale, shift = [1.0] * n_exp, [0.0] * n_exp
    if cfg.mode == "none" or not keep:
        return LayerAffine(layer, scale, shift)
    if cfg.mode == "reference_free":
        lo, mid, hi = _quantiles(noisy_logits[:, keep], (cfg.ipr[0], 0.5, cfg.ipr[1])).T
        rng = np.maximum(hi - lo, 1e-12)
        target = float(np.mean(rng))
        for j, e in enumerate(keep):
            scale[e] = target / float(rng[j])
            shift[e] = -scale[e] * float(mid[j])
        return LayerAffine(layer, scale, shift)
    if clean_q is None:
        raise ValueError(f"router calibration mode {cfg.mode!r} needs the clean model's logit quantiles")
    noisy_q = logit_quantiles(noisy_logits, cfg)
    if cfg.mode == "layer":
        a, b = _lsq(noisy_q[keep].ravel(), clean_q[keep].ravel())
        for e in keep:
            scale[e], shift[e] = a, b
    else:
        for e in keep:
            scale[e], shift[e] = _lsq(noisy_q[e], clean_q[e])
        if cfg.mode == "expert_keep_scale":
            mean_a = float(np.mean([scale[e] for e in keep]))
            if mean_a > 0 and not all(scale[e] == 1.0 and shift[e] == 0.0 for e in keep):
                for e in keep:
                    scale[e], shift[e] = scale[e] / mean_a, shift[e] / mean_a
    return LayerAffine(layer, scale, shift)


class LogitRecorder:
    """Prepended forward hooks that keep the RAW router logits of non-padding tokens, per layer.

    Prepended so that they see the router's own output even when a ROMER hook (which returns
    modified logits) is installed on the same router. ``stop_after`` aborts the forward right
    after that layer's router (sequential fitting needs nothing downstream).
    """

    class Stop(Exception):
        """Raised by the hook of ``stop_after`` to end a forward early."""

    def __init__(self, blocks: list[MoEBlock], layers: set[int] | None = None, stop_after: int | None = None,
                 on_logits: Callable[[int, torch.Tensor], None] | None = None) -> None:
        self.blocks = [b for b in blocks if layers is None or b.layer in layers]
        self.stop_after = stop_after
        self.on_logits = on_logits
        self.logits: dict[int, list[torch.Tensor]] = {b.layer: [] for b in self.blocks}
        self._mask: torch.Tensor | None = None
        self._handles: list[Any] = []

    def set_mask(self, attention_mask: torch.Tensor | None) -> None:
        self._mask = None if attention_mask is None else attention_mask.reshape(-1).bool()

    def _hook(self, layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            z = output[0].detach().float()
            z = z.reshape(-1, z.shape[-1])
            if self._mask is not None:
                z = z[self._mask]
            if self.on_logits is not None:
                self.on_logits(layer, z)
            else:
                self.logits[layer].append(z.clone())
            if layer == self.stop_after:
                raise LogitRecorder.Stop
            return None

        return hook

    def __enter__(self) -> LogitRecorder:
        self._handles = [b.router.register_forward_hook(self._hook(b.layer), prepend=True) for b in self.blocks]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def cat(self, layer: int) -> torch.Tensor:
        chunks = self.logits[layer]
        return torch.cat(chunks) if chunks else torch.empty(0, 0)


def subsample(x: torch.Tensor, max_rows: int, seed: int = 0) -> torch.Tensor:
    """At most ``max_rows`` rows, chosen by a seeded generator (bounds quantile memory)."""
    if x.shape[0] <= max_rows:
        return x
    g = torch.Generator().manual_seed(seed)
    return x[torch.randperm(x.shape[0], generator=g)[:max_rows]]
