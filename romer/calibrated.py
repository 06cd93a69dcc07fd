"""The calibrated model: ROMER's routing hooks, and its directory (HF checkpoint + ``romer.json``).

Why hooks: expert replacement (``split``/``average``) and router calibration change how
tokens are routed and combined, not the model's architecture. Two hooks per MoE layer do it
without copying model code, for every family whose ``mlp.gate`` returns
(logits, top-k weights, top-k indices) and whose ``mlp.experts`` takes
(hidden, top_k_index, top_k_weights) (OLMoE, Qwen2/3-MoE, Mixtral, DeepSeek-MoE v1):

- a router forward hook that RETURNS new outputs: logits through the fitted affine map, cold
  slots masked with a large finite negative, top-k recomputed like the router does
  (`romer.router_calib.route`), and, for ``split``, tokens of a replicated expert dealt to its
  replicas by token index;
- for ``average``, a forward pre-hook and a forward hook on the experts module: a token routed
  to a replicated expert gets weight w/n on every replica (the mean of the copies' outputs,
  times w); the extra (token, replica) pairs are computed by one more call of the experts'
  own forward and added.

The directory is a normal Hugging Face checkpoint (safetensors, config, tokenizer) holding
the replaced experts' CLEAN weights, plus ``romer.json`` (schema below). `load_calibrated`
(and `romer.adapters.load_model`, which detects ``romer.json``) reinstalls the hooks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from romer.adapters import MoEBlock, find_moe_blocks
from romer.replace import MASK_LOGIT, MASKED, LayerPlan, ReplacementPlan
from romer.router_calib import LayerAffine, RouterCalibration, check_routable, route

ROMER_JSON = "romer.json"
SCHEMA_VERSION = 1


@dataclass
class RomerHooks:
    """Installed hook handles; `remove()` restores the plain model's behaviour."""

    handles: list[Any] = field(default_factory=list)
    plan: ReplacementPlan | None = None
    calibration: RouterCalibration | None = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> RomerHooks:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _replica_table(lp: LayerPlan, n_exp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, n_max] replica slots per expert (own index first, padded with it) and [E] replica counts."""
    groups = lp.groups()
    n_max = max([len(s) for s in groups.values()] + [1])
    table = torch.arange(n_exp).unsqueeze(1).repeat(1, n_max)
    count = torch.ones(n_exp, dtype=torch.long)
    for hot, slots in groups.items():
        table[hot, : len(slots)] = torch.tensor(slots)
        count[hot] = len(slots)
    return table, count


def _router_hook(block: MoEBlock, affine: LayerAffine | None, lp: LayerPlan | None, strategy: str | None) -> Any:
    n_exp, k, norm = block.num_experts, block.top_k, block.norm_topk_prob
    scale = shift = None
    if affine is not None and not affine.identity:
        scale = torch.tensor(affine.scale, dtype=torch.float32)
        shift = torch.tensor(affine.shift, dtype=torch.float32)
    mask = None
    table = count = None
    if lp is not None and lp.cold and strategy in MASKED:
        mask = torch.zeros(n_exp, dtype=torch.bool)
        mask[lp.cold] = True
        if strategy == "split":
            table, count = _replica_table(lp, n_exp)

    def hook(module: nn.Module, args: Any, output: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = output[0]
        z = logits.float()
        if scale is not None:
            z = z * scale.to(z.device) + shift.to(z.device)
        if mask is not None:
            z = z.masked_fill(mask.to(z.device), MASK_LOGIT)
        weights, idx = route(z, k, norm)
        if table is not None:
            rows = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)
            j = rows % count.to(idx.device)[idx]
            idx = table.to(idx.device)[idx, j]
        return z.to(logits.dtype), weights.to(logits.dtype), idx

    return hook


def _average_hooks(lp: LayerPlan, n_exp: int) -> tuple[Any, Any]:
    """(pre-hook, forward hook) on ``mlp.experts`` that give a replicated expert the mean of its replicas.

    The pre-hook divides the routing weight of a replicated expert by its replica count n and
    notes the (token, replica, w/n) pairs of the other replicas; the forward hook computes only
    those pairs (one extra call of the experts' own forward with top-k width 1) and adds them.
    Widening every top-k row instead would make grouped/batched kernels compute the padding too.
    """
    table, count = _replica_table(lp, n_exp)
    n_max = table.shape[1]
    names = ("hidden_states", "top_k_index", "top_k_weights")
    pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # this call's extra pairs

    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        pending.clear()
        vals = list(args) + [kwargs.pop(n) for n in names[len(args):] if n in kwargs]
        hidden, idx, w = vals[0], vals[1], vals[2]
        n = count.to(idx.device)[idx]  # [N, k]
        if bool((n == 1).all()):
            return (hidden, idx, w, *vals[3:]), kwargs
        w_mean = w / n.to(w.dtype)
        extra = table.to(idx.device)[idx][..., 1:]  # [N, k, n_max - 1]
        valid = torch.arange(1, n_max, device=idx.device) < n.unsqueeze(-1)
        rows = torch.nonzero(valid, as_tuple=True)[0]
        pending.append((hidden, rows, extra[valid], w_mean.unsqueeze(-1).expand_as(extra)[valid]))
        return (hidden, idx, w_mean, *vals[3:]), kwargs

    def post_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> Any:
        if not pending:
            return None
        hidden, rows, e_idx, e_w = pending.pop()
        extra_out = module.forward(hidden[rows], e_idx.unsqueeze(1), e_w.unsqueeze(1))  # no hooks: no recursion
        return output.index_add(0, rows, extra_out.to(output.dtype))

    return pre_hook, post_hook


def _shared_hook(block: MoEBlock, lp: LayerPlan) -> Any:
    """Forward hook on the shared expert: each replicated slice j becomes the mean of its 1 + n_j instances.

    The shared output is the sum of its slices a_j; with replicas r_jc (cold slots, computed by
    the experts' own forward at weight 1 / (1 + n_j)) it becomes
    out - sum_j n_j / (1 + n_j) a_j + sum_j sum_c r_jc / (1 + n_j). When every slice has the same
    n this is (out + sum r) / (1 + n) and the a_j are not computed.
    """
    experts, shared = block.experts, block.shared[0]  # type: ignore[index]
    inter = experts.down_proj.shape[-1]
    n_slices = shared.gate_proj.weight.shape[0] // inter
    per_slice = torch.zeros(n_slices, dtype=torch.long)
    for j in lp.shared_slice:
        per_slice[j] += 1
    uniform = bool((per_slice == per_slice[0]).all())
    slots = torch.tensor(lp.cold, dtype=torch.long)
    w_slot = torch.tensor([1.0 / (1 + int(per_slice[j])) for j in lp.shared_slice])
    act = shared.act_fn

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        flat = x.reshape(-1, x.shape[-1])
        n = flat.shape[0]
        idx = slots.to(flat.device).unsqueeze(0).expand(n, -1)
        w = w_slot.to(device=flat.device, dtype=flat.dtype).unsqueeze(0).expand(n, -1)
        rep = experts.forward(flat, idx, w).reshape(output.shape).to(output.dtype)  # no hooks: plain replicas
        if uniform:
            return output * float(w_slot[0]) + rep
        out = output
        for j in range(n_slices):
            nj = int(per_slice[j])
            if nj == 0:
                continue
            sl = slice(j * inter, (j + 1) * inter)
            a = F.linear(act(F.linear(x, shared.gate_proj.weight[sl])) * F.linear(x, shared.up_proj.weight[sl]),
                         shared.down_proj.weight[:, sl])
            out = out - a * (nj / (1 + nj))
        return out + rep

    return hook


def install_romer(model: nn.Module, plan: ReplacementPlan | None, calibration: RouterCalibration | None,
                  blocks: list[MoEBlock] | None = None) -> RomerHooks:
    """Install the routing hooks of a replacement plan and/or a router calibration (weights untouched)."""
    blocks = blocks if blocks is not None else find_moe_blocks(model)
    hooks = RomerHooks(plan=plan, calibration=calibration)
    strategy = plan.strategy if plan is not None else None
    for b in blocks:
        lp = plan.layer(b.layer) if plan is not None else None
        affine = calibration.layers.get(b.layer) if calibration is not None else None
        routed = lp is not None and bool(lp.cold) and strategy in MASKED
        if routed or (affine is not None and not affine.identity):
            check_routable(b)
            hooks.handles.append(b.router.register_forward_hook(_router_hook(b, affine, lp, strategy)))
        if lp is not None and lp.cold and strategy == "average":
            pre, post = _average_hooks(lp, b.num_experts)
            hooks.handles.append(b.experts.register_forward_pre_hook(pre, with_kwargs=True))
            hooks.handles.append(b.experts.register_forward_hook(post, with_kwargs=True))
        if lp is not None and lp.cold and strategy == "average_shared":
            if not b.shared:
                raise ValueError(f"layer {b.layer}: average_shared needs a shared expert")
            hooks.handles.append(b.shared[0].register_forward_hook(_shared_hook(b, lp)))
    return hooks


def romer_meta(plan: ReplacementPlan | None, calibration: RouterCalibration | None, noise: dict[str, Any] | None,
               metrics: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``romer.json`` document."""
    return {
        "schema_version": SCHEMA_VERSION,
        "replacement": plan.to_dict() if plan is not None else None,
        "router_calibration": calibration.to_dict() if calibration is not None else None,
        "noise_model": noise,
        "metrics": metrics or {},
        **(extra or {}),
    }


def save_calibrated(model: nn.Module, tokenizer: Any, out_dir: str | Path, plan: ReplacementPlan | None,
                    calibration: RouterCalibration | None, noise: dict[str, Any] | None,
                    metrics: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write the (clean, replaced) model as safetensors + config + tokenizer, and ``romer.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    meta = romer_meta(plan, calibration, noise, metrics, extra)
    (out / ROMER_JSON).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return out


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    """``romer.json`` of a calibrated model directory (FileNotFoundError if it is not one)."""
    path = Path(model_dir) / ROMER_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{str(model_dir)!r} is not a calibrated model (no {ROMER_JSON})")
    meta = json.loads(path.read_text())
    if int(meta.get("schema_version", 0)) > SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {meta['schema_version']} is newer than this romer "
                         f"({SCHEMA_VERSION})")
    return meta


def attach_from_meta(model: nn.Module, meta: dict[str, Any]) -> RomerHooks:
    """Install the hooks described by a ``romer.json`` document; kept on ``model.romer_hooks``."""
    plan = ReplacementPlan.from_dict(meta["replacement"]) if meta.get("replacement") else None
    calib = RouterCalibration.from_dict(meta["router_calibration"]) if meta.get("router_calibration") else None
    hooks = install_romer(model, plan, calib)
    model.romer_hooks = hooks  # type: ignore[assignment]  # lives with the model, not in a global
    model.romer_meta = meta  # type: ignore[assignment]
    return hooks


def load_calibrated(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a calibrated model directory with its calibration active (hooks on ``model.romer_hooks``)."""
    from romer.adapters import load_model

    read_meta(model_dir)  # clear error if the directory is not a calibrated model
    model = load_model(model_dir, dtype=dtype)  # load_model sees romer.json and attaches the hooks
    if getattr(model, "romer_hooks", None) is None:  # pragma: no cover - load_model always attaches
        attach_from_meta(model, read_meta(model_dir))
    return model
