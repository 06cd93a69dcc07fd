"""DeepSeek-MoE v1 (deepseek-moe-16b, custom code) -> transformers' native Qwen2-MoE layout.

Why: transformers 5.x has no native class for DeepSeek-MoE v1 and we never run remote code.
The v1 architecture is Llama attention + an MoE block that Qwen2-MoE can express exactly:

- router: softmax(x W_g^T), top-k, renormalised only if ``norm_topk_prob`` (False for the
  published 16B models) -> Qwen2-MoE's router with the same ``norm_topk_prob``;
- routed experts: SwiGLU MLPs -> fused ``experts.gate_up_proj`` [E, 2I, H] (gate rows first)
  and ``experts.down_proj`` [E, H, I];
- shared experts: v1 already holds them as one MLP of n_shared_experts x moe_intermediate_size
  -> Qwen2's single ``shared_expert``; Qwen2 multiplies it by sigmoid(shared_expert_gate(x)), so
  the gate weights are zero (sigmoid(0) = 0.5) and the shared down-projection is doubled
  (2 x 0.5 = 1 exactly in floating point);
- dense layers (i < first_k_dense_replace, or i % moe_layer_freq != 0) -> ``mlp_only_layers``
  with the dense ``intermediate_size``;
- attention has no biases -> ``qkv_bias=False``.

The converted config carries ``romer_source_family = "deepseek_moe_v1"`` so that
`romer.adapters` reports the family correctly. Weights are read and written as safetensors.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

V1_FAMILY = "deepseek_moe_v1"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "generation_config.json")


def _moe_layers(v1: Mapping[str, Any]) -> list[bool]:
    k = int(v1.get("first_k_dense_replace", 0) or 0)
    freq = int(v1.get("moe_layer_freq", 1) or 1)
    has_experts = v1.get("n_routed_experts") is not None
    return [has_experts and i >= k and i % freq == 0 for i in range(int(v1["num_hidden_layers"]))]


def qwen2_config(v1: Mapping[str, Any]) -> Any:
    """The Qwen2MoeConfig equivalent to a DeepSeek-MoE v1 config.json (as a dict)."""
    from transformers import Qwen2MoeConfig

    if v1.get("attention_bias"):
        raise ValueError("DeepSeek-MoE v1 with attention_bias=True cannot be expressed as Qwen2-MoE (o_proj bias)")
    if v1.get("scoring_func", "softmax") != "softmax":
        raise ValueError(f"DeepSeek-MoE v1 scoring_func {v1.get('scoring_func')!r} not supported (softmax only)")
    if v1.get("rope_scaling"):
        raise ValueError("DeepSeek-MoE v1 with rope_scaling is not supported by this converter")
    moe = _moe_layers(v1)
    n_shared = int(v1.get("n_shared_experts") or 0)
    inter = int(v1["moe_intermediate_size"])
    return Qwen2MoeConfig(
        vocab_size=int(v1["vocab_size"]),
        hidden_size=int(v1["hidden_size"]),
        intermediate_size=int(v1["intermediate_size"]),
        num_hidden_layers=int(v1["num_hidden_layers"]),
        num_attention_heads=int(v1["num_attention_heads"]),
        num_key_value_heads=int(v1.get("num_key_value_heads") or v1["num_attention_heads"]),
        hidden_act=v1.get("hidden_act", "silu"),
        max_position_embeddings=int(v1.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(v1.get("rms_norm_eps", 1e-6)),
        rope_parameters={"rope_type": "default", "rope_theta": float(v1.get("rope_theta", 10000.0))},
        tie_word_embeddings=bool(v1.get("tie_word_embeddings", False)),
        use_sliding_window=False,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i, m in enumerate(moe) if not m],
        moe_intermediate_size=inter,
        shared_expert_intermediate_size=max(1, n_shared * inter),
        num_experts=int(v1.get("n_routed_experts") or 1),
        num_experts_per_tok=int(v1.get("num_experts_per_tok", 1)),
        norm_topk_prob=bool(v1.get("norm_topk_prob", False)),
        router_aux_loss_coef=float(v1.get("aux_loss_alpha", 0.001)),
        qkv_bias=False,
        bos_token_id=v1.get("bos_token_id"),
        eos_token_id=v1.get("eos_token_id"),
        pad_token_id=v1.get("pad_token_id"),
        romer_source_family=V1_FAMILY,
    )


def convert_state_dict(v1: Mapping[str, Any], sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename/fuse a v1 state dict into Qwen2-MoE keys (tensors shared where no change is needed)."""
    moe = _moe_layers(v1)
    n_exp = int(v1.get("n_routed_experts") or 0)
    n_shared = int(v1.get("n_shared_experts") or 0)
    hidden = int(v1["hidden_size"])
    out: dict[str, torch.Tensor] = {}
    expert_key = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.\d+\.")
    for k, v in sd.items():
        if expert_key.match(k) or ".mlp.shared_experts." in k:
            continue  # handled per layer below
        out[k] = v
    for i, is_moe in enumerate(moe):
        if not is_moe:
            continue
        p = f"model.layers.{i}.mlp"
        try:
            gate_up = [torch.cat([sd[f"{p}.experts.{j}.gate_proj.weight"], sd[f"{p}.experts.{j}.up_proj.weight"]], 0)
                       for j in range(n_exp)]
            down = [sd[f"{p}.experts.{j}.down_proj.weight"] for j in range(n_exp)]
        except KeyError as e:
            raise ValueError(f"v1 state dict lacks {e.args[0]!r}") from None
        out[f"{p}.experts.gate_up_proj"] = torch.stack(gate_up)
        out[f"{p}.experts.down_proj"] = torch.stack(down)
        dtype = down[0].dtype
        if n_shared:
            out[f"{p}.shared_expert.gate_proj.weight"] = sd[f"{p}.shared_experts.gate_proj.weight"]
            out[f"{p}.shared_expert.up_proj.weight"] = sd[f"{p}.shared_experts.up_proj.weight"]
            out[f"{p}.shared_expert.down_proj.weight"] = sd[f"{p}.shared_experts.down_proj.weight"] * 2
        else:  # no shared experts: a zero shared expert of width 1 contributes exactly 0
            out[f"{p}.shared_expert.gate_proj.weight"] = torch.zeros(1, hidden, dtype=dtype)
            out[f"{p}.shared_expert.up_proj.weight"] = torch.zeros(1, hidden, dtype=dtype)
            out[f"{p}.shared_expert.down_proj.weight"] = torch.zeros(hidden, 1, dtype=dtype)
        out[f"{p}.shared_expert_gate.weight"] = torch.zeros(1, hidden, dtype=dtype)
    return out


def build_model(v1: Mapping[str, Any], sd: Mapping[str, torch.Tensor]) -> Any:
    """A Qwen2MoeForCausalLM holding the converted weights (strict load: every key must match)."""
    from transformers import Qwen2MoeForCausalLM

    cfg = qwen2_config(v1)
    new = convert_state_dict(v1, sd)
    with torch.device("meta"):
        model = Qwen2MoeForCausalLM(cfg)
    if cfg.tie_word_embeddings:
        new.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(new, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"v1 conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    # non-persistent buffers (rotary inv_freq) were created on meta: rebuild the module on CPU
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)
    return model.eval()


def convert_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Convert a local v1 checkpoint directory (config.json + *.safetensors) into ``dst``."""
    from safetensors.torch import load_file

    src, dst = Path(src), Path(dst)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{src} has no config.json")
    v1 = json.loads(cfg_path.read_text())
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src} has no .safetensors weights (pickled .bin weights are not loaded)")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    model = build_model(v1, sd)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dst))
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return dst
