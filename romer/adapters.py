"""MoE model adapters: one small, readable map from each supported family to its MoE parts.

ROMER needs the same handful of things from every MoE family: the routers (to record and
later recalibrate their decisions), the routed experts (fused 3-D tensors in transformers
5.x: ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj`` [E, H, I]), the shared
experts if any, and the top-k settings. `find_moe_blocks` returns them as `MoEBlock`s found
through module attributes only; no model code is copied.

Supported (transformers 5.x native classes): OLMoE, Qwen2-MoE, Qwen3-MoE, Mixtral,
DeepSeek-V2, DeepSeek-V3, and DeepSeek-MoE v1 after conversion to the Qwen2-MoE layout by
`romer.deepseek_v1` (recognised by ``config.romer_source_family``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# model_type -> family name; the family name is what reports and romer.json carry.
FAMILIES: dict[str, str] = {
    "olmoe": "olmoe",
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
    "mixtral": "mixtral",
    "deepseek_v2": "deepseek_v2",
    "deepseek_v3": "deepseek_v3",
}
V1_FAMILY = "deepseek_moe_v1"
_V1_MARKS = ("deepseek-moe", V1_FAMILY)  # config.romer_family written by scripts/train_tiny_moe.py
ALL_FAMILIES: tuple[str, ...] = (*FAMILIES.values(), V1_FAMILY)


class UnsupportedModelError(ValueError):
    """The model is not one of the supported MoE families; the message names its class."""


@dataclass
class MoEBlock:
    """The MoE parts of one decoder layer (references into the live model, not copies)."""

    layer: int
    module: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: list[nn.Module] | None
    shared_gate: nn.Module | None
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    family: str
    router_bias: torch.Tensor | None = None  # DeepSeek-V3 e_score_correction_bias (digital, selection only)
    n_group: int = 1
    topk_group: int = 1
    scoring: str = "softmax"  # "softmax" or "sigmoid" (DeepSeek-V3)
    prefix: str = ""  # parameter-name prefix of the block, e.g. "model.layers.3.mlp"


def model_family(model: nn.Module) -> str:
    """Family name of a loaded model, or UnsupportedModelError naming its class."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type == "qwen2_moe" and (getattr(config, "romer_source_family", None) == V1_FAMILY
                                      or getattr(config, "romer_family", None) in _V1_MARKS):
        return V1_FAMILY
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    raise UnsupportedModelError(
        f"model class {type(model).__name__} (model_type={model_type!r}) is not a supported MoE family; "
        f"supported: {', '.join(ALL_FAMILIES)}")


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layer list and its name prefix (``model.layers`` for *ForCausalLM)."""
    for prefix in ("model.layers", "layers"):
        obj: Any = model
        for part in prefix.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return prefix, obj
    raise UnsupportedModelError(f"model class {type(model).__name__} has no decoder layer list (model.layers)")


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """All MoE blocks of a supported model, in layer order; dense layers are skipped."""
    family = model_family(model)
    prefix, layers = decoder_layers(model)
    blocks: list[MoEBlock] = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not hasattr(mlp, "experts") or not hasattr(mlp, "gate"):
            continue  # dense MLP layer (first_k_dense_replace, mlp_only_layers)
        router, experts = mlp.gate, mlp.experts
        if not hasattr(experts, "gate_up_proj") or not hasattr(experts, "down_proj"):
            raise UnsupportedModelError(
                f"model class {type(model).__name__}: layer {i} experts ({type(experts).__name__}) lack fused "
                "gate_up_proj/down_proj tensors (transformers >= 5 layout expected)")
        shared: list[nn.Module] | None = None
        shared_gate = None
        if hasattr(mlp, "shared_expert"):  # Qwen2-MoE (and converted DeepSeek-MoE v1)
            shared = [mlp.shared_expert]
            shared_gate = getattr(mlp, "shared_expert_gate", None)
        elif hasattr(mlp, "shared_experts"):  # DeepSeek-V2/V3: one MLP of n_shared * moe_intermediate
            shared = [mlp.shared_experts]
        norm = getattr(router, "norm_topk_prob", None)
        if norm is None:  # Mixtral always renormalises; DeepSeek-V2 never does
            norm = family == "mixtral"
        block = MoEBlock(
            layer=i, module=mlp, router=router, experts=experts, shared=shared, shared_gate=shared_gate,
            num_experts=int(router.num_experts), top_k=int(router.top_k), norm_topk_prob=bool(norm),
            family=family,
            router_bias=getattr(router, "e_score_correction_bias", None),
            n_group=int(getattr(router, "num_group", 1) or 1),
            topk_group=int(getattr(router, "topk_group", 1) or 1),
            scoring="sigmoid" if family == "deepseek_v3" else "softmax",
            prefix=f"{prefix}.{i}.mlp",
        )
        blocks.append(block)
    if not blocks:
        raise UnsupportedModelError(f"model class {type(model).__name__} has no MoE blocks (all layers dense?)")
    return blocks


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a local checkpoint (never downloads) in eval mode; family checked early."""
    from transformers import AutoModelForCausalLM

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {str(path)!r} has no config.json")
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    model_family(model)
    model.eval()
    if (path / "romer.json").is_file():  # a ROMER-calibrated model: reinstall its routing hooks
        from romer.calibrated import attach_from_meta, read_meta

        attach_from_meta(model, read_meta(path))
    return model


def load_tokenizer(model_dir: str | Path) -> Any:
    """The tokenizer saved with a checkpoint (local files only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def tiny_config(family: str, *, vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 2,
                num_experts: int = 8, top_k: int = 2, moe_intermediate: int = 16, **overrides: Any) -> Any:
    """A small random-init config of a family, for tests and benchmarks (not for training)."""
    from transformers import (
        DeepseekV2Config,
        DeepseekV3Config,
        MixtralConfig,
        OlmoeConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    heads = max(2, hidden_size // 16)
    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
        num_experts_per_tok=top_k, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)
    for k in list(overrides):  # overrides may replace the common settings too
        if k in common:
            common[k] = overrides.pop(k)
    inter = moe_intermediate
    if family == "olmoe":
        cfg = OlmoeConfig(**common, intermediate_size=inter, num_experts=num_experts, **overrides)
    elif family == "qwen2_moe":
        cfg = Qwen2MoeConfig(**common, intermediate_size=3 * inter, moe_intermediate_size=inter,
                             shared_expert_intermediate_size=2 * inter, num_experts=num_experts, **overrides)
    elif family == "qwen3_moe":
        cfg = Qwen3MoeConfig(**common, intermediate_size=3 * inter, moe_intermediate_size=inter,
                             num_experts=num_experts, head_dim=hidden_size // heads, **overrides)
    elif family == "mixtral":
        cfg = MixtralConfig(**common, intermediate_size=inter, num_local_experts=num_experts, **overrides)
    elif family in ("deepseek_v2", "deepseek_v3"):
        mla: dict[str, Any] = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                   intermediate_size=3 * inter, moe_intermediate_size=inter,
                                   n_routed_experts=num_experts, n_shared_experts=1, first_k_dense_replace=1)
        if family == "deepseek_v2":
            cfg = DeepseekV2Config(**common, **mla, q_lora_rank=None, n_group=1, topk_group=1,
                                   **overrides)
        else:
            cfg = DeepseekV3Config(**common, **mla, q_lora_rank=16, n_group=2, topk_group=1, **overrides)
    else:
        raise UnsupportedModelError(f"no tiny config for family {family!r}; known: {', '.join(FAMILIES)}")
    return cfg
