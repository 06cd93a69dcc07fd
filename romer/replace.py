"""Expert replacement: under-activated experts' arrays are reused for copies of hot experts.

Why: analog noise unbalances MoE routing (ROMER, 2026); an expert that the noisy chip rarely
selects wastes its crossbar arrays. Its slot can hold a copy of a frequently used expert.
Each copy is a separate physical array, so it is programmed from the CLEAN source weights and
carries its own, independent noise draw (`apply_replacement` edits the clean model; noise is
injected afterwards, and `romer.inject` keys every matrix's RNG by (seed, tensor, slot), so
each slot draws differently).

Selection (`ReplaceConfig.select`), on load counts measured under the chip's noise on
calibration text:

- ``threshold`` (default, 0.25, at most m = 4 per layer): experts whose share of routed tokens
  under noise is below ``threshold`` x the uniform share (k/E per token). Replacing costs
  perplexity even without noise (masking 4 of 64 experts: +1..6 % clean), so only really cold
  experts are worth it; with little noise nothing is replaced;
- ``bottom``: the ``m`` least-used experts of every layer.

Gate (``ReplaceConfig.gate``, default on; applied by `romer.calibrate`): the plan is kept only
if it lowers the next-token loss on the calibration text of the noisy instance it was measured
on; replacement costs perplexity by itself (masked experts), and the ablations showed it rarely
pays on balanced models.

Cold slots are paired with the hottest experts in order (coldest <- hottest, ...), cycling
when ``copies_per_expert`` > 1 lets one hot expert receive several copies.

Strategies (`ReplaceConfig.strategy`):

- ``copy``: the hot expert's weights go into the cold slot, which keeps its own router row
  (the cold expert's tokens now reach a copy of the hot expert). No hook needed.
- ``split``: the hot expert is replicated; the cold slot's router logit is masked (-1e4, a
  large finite number: -inf gives NaN through a linear map) so selection is the clean
  model's, and the tokens routed to the hot expert are split deterministically between its
  replicas by flattened token index (row r goes to replica r mod n). Load is balanced; noise
  per token is not reduced.
- ``average`` (averaged replicas): as ``split`` but a token routed to a replicated expert gets
  the MEAN of its replicas' outputs (weight w/n on each), so that expert's independent noise
  shrinks by ~1/sqrt(n). The cold expert's tokens go to their next choice.

- ``average_shared`` (the default on shared-expert families: Qwen2-MoE, DeepSeek-MoE v1): the cold
  slots hold slices of the SHARED expert instead of hot routed experts. A shared expert of
  width S is the sum of S/I slices of width I (rows of gate/up, columns of down), each the shape
  of a routed expert, so slice j fits into a slot. The cold slots are masked from routing and
  every token's shared output becomes, per replicated slice, the mean of the shared expert's
  own (noisy) slice and its replica(s): the shared expert runs on every token, so this lowers
  noise on every token. ``LayerPlan.source`` is -1 and ``LayerPlan.shared_slice`` names the
  slice. The slots are the n x ``shared_copies`` coldest of the layer (n = S / I slices;
  ``select``/``threshold``/``m`` do not apply): every slice gets ``shared_copies`` replicas.
  Default: ``ReplaceConfig(strategy="average", shared_replicas=True)`` plans ``average_shared``
  whenever the model's shared expert splits (``n_slices`` given, as `romer.calibrate` does),
  and ``average`` otherwise (OLMoE, Mixtral: unchanged). Measured in results/proof.md
  ("Shared-expert replicas"): Qwen-style +21 %, DeepSeek-style +14 % at pcm@16.

The routing parts of ``split``, ``average`` and ``average_shared`` are installed as hooks by
`romer.calibrated` (`install_romer`), never by copying model code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from romer.adapters import MoEBlock, find_moe_blocks

STRATEGIES = ("copy", "split", "average", "average_shared")
MASKED = ("split", "average", "average_shared")  # strategies whose cold slots leave routing
SELECTIONS = ("bottom", "threshold")
MASK_LOGIT = -1.0e4  # finite: -inf turns into NaN once it meets a linear map or 0 * -inf


@dataclass(frozen=True)
class ReplaceConfig:
    """Which experts are replaced, by what, and how the copies are used."""

    strategy: str = "average"
    select: str = "threshold"
    m: int = 4  # bottom-m per layer (also the cap for "threshold")
    threshold: float = 0.25  # share of the uniform load k/E below which an expert is "cold"
    copies_per_expert: int = 1  # copies one hot expert may receive
    gate: bool = True  # keep the plan only if it lowers the calibration-text loss on the noisy instance
    # with strategy "average" on a model whose shared expert splits into routed-expert slices
    # (Qwen2-MoE, DeepSeek-MoE v1): plan "average_shared" instead (see the module doc)
    shared_replicas: bool = True
    shared_copies: int = 1  # average_shared: replicas per slice of the shared expert

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} unknown; expected one of {STRATEGIES}")
        if self.select not in SELECTIONS:
            raise ValueError(f"select {self.select!r} unknown; expected one of {SELECTIONS}")
        if self.m < 0 or self.copies_per_expert < 1 or self.shared_copies < 1 or self.threshold < 0:
            raise ValueError(f"need m >= 0, copies_per_expert >= 1, threshold >= 0; got {self}")


@dataclass
class LayerPlan:
    """Replacements of one MoE layer: slot ``cold[i]`` receives a copy of expert ``source[i]``."""

    layer: int
    cold: list[int] = field(default_factory=list)
    source: list[int] = field(default_factory=list)
    shared_slice: list[int] = field(default_factory=list)  # average_shared: slice of the shared expert per slot

    def groups(self) -> dict[int, list[int]]:
        """Hot expert -> its replica slots, the original first."""
        g: dict[int, list[int]] = {}
        for c, s in zip(self.cold, self.source, strict=True):
            if s < 0:  # a slice of the shared expert, not a routed expert's replica
                continue
            g.setdefault(s, [s]).append(c)
        return g


@dataclass
class ReplacementPlan:
    """The replacement of all layers; JSON round trip via to_dict/from_dict."""

    strategy: str
    layers: list[LayerPlan] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def n_replaced(self) -> int:
        return sum(len(lp.cold) for lp in self.layers)

    def layer(self, index: int) -> LayerPlan | None:
        for lp in self.layers:
            if lp.layer == index:
                return lp
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "layers": [asdict(lp) for lp in self.layers], "config": self.config}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReplacementPlan:
        return cls(strategy=d["strategy"], layers=[LayerPlan(**lp) for lp in d.get("layers", [])],
                   config=dict(d.get("config", {})))


def select_cold(counts: np.ndarray, tokens: int, top_k: int, cfg: ReplaceConfig) -> list[int]:
    """Cold experts of one layer, coldest first (ties broken by expert index for determinism)."""
    c = np.asarray(counts, dtype=np.float64)
    order = np.lexsort((np.arange(c.size), c))  # ascending count, then index
    if cfg.select == "bottom":
        return [int(e) for e in order[: cfg.m]]
    uniform = top_k / c.size
    share = c / max(tokens, 1)
    cold = [int(e) for e in order if share[e] < cfg.threshold * uniform]
    return cold[: cfg.m]


def shared_slices(block: MoEBlock) -> int:
    """How many routed-expert-shaped slices the block's shared expert splits into (0: not splittable)."""
    if not block.shared or len(block.shared) != 1:
        return 0
    m = block.shared[0]
    if not all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return 0
    width = m.gate_proj.weight.shape[0]
    inter = block.experts.down_proj.shape[-1]
    if width % inter or m.gate_proj.weight.shape[1] != block.experts.gate_up_proj.shape[-1]:
        return 0
    return width // inter


def plan_replacement(counts: dict[int, np.ndarray], tokens: dict[int, int], top_k: dict[int, int],
                     cfg: ReplaceConfig, n_slices: dict[int, int] | None = None) -> ReplacementPlan:
    """Pair each layer's cold slots with its hottest experts (never a cold one as source).

    ``average_shared``: the cold slots receive slices of the shared expert instead
    (``n_slices``: layer -> `shared_slices` of its block; layers without one get no plan).
    """
    layers: list[LayerPlan] = []
    shared = cfg.strategy == "average_shared" or (
        cfg.strategy == "average" and cfg.shared_replicas and any((n_slices or {}).values()))
    strategy = "average_shared" if shared else cfg.strategy
    for layer in sorted(counts):
        c = np.asarray(counts[layer], dtype=np.float64)
        if shared:  # the n x shared_copies coldest slots, whatever select/threshold/m say
            n = (n_slices or {}).get(layer, 0)
            cold = [int(e) for e in np.lexsort((np.arange(c.size), c))][: n * cfg.shared_copies]
            layers.append(LayerPlan(layer, cold=cold, source=[-1] * len(cold),
                                    shared_slice=[i % n for i in range(len(cold))] if n else []))
            continue
        cold = select_cold(c, tokens[layer], top_k[layer], cfg)
        if not cold:
            layers.append(LayerPlan(layer))
            continue
        hot = [int(e) for e in np.lexsort((np.arange(c.size), -c)) if int(e) not in set(cold)]
        max_sources = len(hot)
        cold = cold[: max_sources * cfg.copies_per_expert]
        source = [hot[i % max(1, -(-len(cold) // cfg.copies_per_expert))] for i in range(len(cold))]
        layers.append(LayerPlan(layer, cold=cold, source=source))
    return ReplacementPlan(strategy=strategy, layers=layers, config=asdict(cfg))


@dataclass
class ReplacementHandle:
    """Undo record of `apply_replacement` (clean rows of the touched slots)."""

    blocks: list[MoEBlock]
    backup: list[tuple[torch.Tensor, int, torch.Tensor]] = field(default_factory=list, repr=False)
    restored: bool = False

    def restore(self) -> None:
        if self.restored:
            return
        with torch.no_grad():
            for param, slot, row in reversed(self.backup):
                param[slot].copy_(row)
        self.backup.clear()
        self.restored = True

    def __enter__(self) -> ReplacementHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def apply_replacement(model: nn.Module, plan: ReplacementPlan, blocks: list[MoEBlock] | None = None
                      ) -> ReplacementHandle:
    """Copy source experts' (clean) weights into their cold slots, in place; router rows too for split/average.

    Call on the CLEAN model, before noise injection: each slot then gets its own noise draw.
    """
    blocks = blocks if blocks is not None else find_moe_blocks(model)
    by_layer = {b.layer: b for b in blocks}
    handle = ReplacementHandle(blocks=blocks)
    with torch.no_grad():
        for lp in plan.layers:
            b = by_layer[lp.layer]
            if plan.strategy == "average_shared":
                _copy_shared_slices(b, lp, handle)
                continue
            params = [b.experts.gate_up_proj, b.experts.down_proj]
            if plan.strategy in MASKED:
                params.append(b.router.weight)  # replica = weights AND router row (the row is masked anyway)
            for c, s in zip(lp.cold, lp.source, strict=True):
                for p in params:
                    handle.backup.append((p, c, p[c].detach().clone()))
                    p[c].copy_(p[s])
    return handle


def _copy_shared_slices(b: MoEBlock, lp: LayerPlan, handle: ReplacementHandle) -> None:
    """Slot cold[i] <- slice shared_slice[i] of the shared expert (gate/up rows, down columns)."""
    n = shared_slices(b)
    if n == 0 and lp.cold:
        raise ValueError(f"layer {b.layer}: no shared expert that splits into routed-expert slices")
    m = b.shared[0]  # type: ignore[index]
    inter = b.experts.down_proj.shape[-1]
    gu, dn = b.experts.gate_up_proj, b.experts.down_proj
    for c, j in zip(lp.cold, lp.shared_slice, strict=True):
        sl = slice(j * inter, (j + 1) * inter)
        for p in (gu, dn):
            handle.backup.append((p, c, p[c].detach().clone()))
        gu[c].copy_(torch.cat([m.gate_proj.weight[sl], m.up_proj.weight[sl]], dim=0))
        dn[c].copy_(m.down_proj.weight[:, sl])


def physical_counts(counts: np.ndarray, lp: LayerPlan | None, strategy: str) -> np.ndarray:
    """Per-slot (physical array) load from logical routing counts.

    For ``average`` every replica slot computes every token of its group; for the other
    strategies the router hook already routes tokens to the slots, so counts are physical.
    ``average_shared`` slots (shared-expert slices) are masked from routing and counted 0 here,
    although physically they compute every token.
    """
    c = np.asarray(counts, dtype=np.int64).copy()
    if lp is None or strategy != "average":
        return c
    for hot, slots in lp.groups().items():
        for s in slots[1:]:
            c[s] = c[hot]
    return c
