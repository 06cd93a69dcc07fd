"""Adapters: discovery per family through a real save/load round trip; DeepSeek-MoE v1 conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from romer.adapters import FAMILIES, UnsupportedModelError, find_moe_blocks, load_model, model_family, tiny_config
from romer.deepseek_v1 import V1_FAMILY, build_model, convert_checkpoint

EXPECT = {  # family -> (MoE layers of a 2-layer tiny model, has shared expert, norm_topk_prob)
    "olmoe": ([0, 1], False, False),
    "qwen2_moe": ([0, 1], True, False),
    "qwen3_moe": ([0, 1], False, False),
    "mixtral": ([0, 1], False, True),
    "deepseek_v2": ([1], True, False),
    "deepseek_v3": ([1], True, True),
}


def save_tiny(family: str, path: Path, seed: int = 0, **kw: object) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(tiny_config(family, **kw)).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_discovery_per_family(family: str, tmp_path: Path) -> None:
    model = load_model(save_tiny(family, tmp_path / family))
    layers, shared, norm = EXPECT[family]
    blocks = find_moe_blocks(model)
    assert model_family(model) == family
    assert [b.layer for b in blocks] == layers
    for b in blocks:
        assert (b.num_experts, b.top_k, b.family, b.norm_topk_prob) == (8, 2, family, norm)
        assert (b.shared is not None) == shared
        assert b.experts.gate_up_proj.shape == (8, 32, 32) and b.experts.down_proj.shape == (8, 32, 16)
        assert b.router.weight.shape == (8, 32)
        assert b.prefix == f"model.layers.{b.layer}.mlp"
        # the router returns (logits, weights, indices) on flattened tokens
        out = b.router(torch.randn(3, 5, 32))
        assert out[2].shape == (15, 2)
    if family == "deepseek_v3":
        assert blocks[0].router_bias is not None and blocks[0].n_group == 2 and blocks[0].scoring == "sigmoid"


def test_unsupported_model_names_class(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        find_moe_blocks(model)
    model.save_pretrained(str(tmp_path / "llama"))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        load_model(tmp_path / "llama")


# ---- DeepSeek-MoE v1 -------------------------------------------------------------------------

V1_CONFIG = {
    "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "vocab_size": 64, "hidden_size": 32,
    "intermediate_size": 48, "moe_intermediate_size": 8, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 4, "n_shared_experts": 2, "n_routed_experts": 8, "num_experts_per_tok": 3,
    "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False, "scoring_func": "softmax",
    "aux_loss_alpha": 0.001, "hidden_act": "silu", "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "tie_word_embeddings": False,
}


def v1_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the published DeepSeek-MoE v1 key names."""
    g = torch.Generator().manual_seed(seed)
    h, v, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    mi, di, sh = cfg["moe_intermediate_size"], cfg["intermediate_size"], cfg["n_shared_experts"]

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    sd = {"model.embed_tokens.weight": r(v, h), "model.norm.weight": 1 + r(h), "lm_head.weight": r(v, h)}
    for i in range(L):
        p = f"model.layers.{i}"
        for n in ("q", "k", "v", "o"):
            sd[f"{p}.self_attn.{n}_proj.weight"] = r(h, h)
        sd[f"{p}.input_layernorm.weight"] = 1 + r(h)
        sd[f"{p}.post_attention_layernorm.weight"] = 1 + r(h)
        if i < cfg["first_k_dense_replace"]:
            sd[f"{p}.mlp.gate_proj.weight"], sd[f"{p}.mlp.up_proj.weight"] = r(di, h), r(di, h)
            sd[f"{p}.mlp.down_proj.weight"] = r(h, di)
            continue
        sd[f"{p}.mlp.gate.weight"] = r(cfg["n_routed_experts"], h)
        for j in range(cfg["n_routed_experts"]):
            sd[f"{p}.mlp.experts.{j}.gate_proj.weight"] = r(mi, h)
            sd[f"{p}.mlp.experts.{j}.up_proj.weight"] = r(mi, h)
            sd[f"{p}.mlp.experts.{j}.down_proj.weight"] = r(h, mi)
        sd[f"{p}.mlp.shared_experts.gate_proj.weight"] = r(sh * mi, h)
        sd[f"{p}.mlp.shared_experts.up_proj.weight"] = r(sh * mi, h)
        sd[f"{p}.mlp.shared_experts.down_proj.weight"] = r(h, sh * mi)
    return sd


def _swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def v1_moe_reference(x: torch.Tensor, sd: dict[str, torch.Tensor], p: str, cfg: dict) -> torch.Tensor:
    """DeepSeek-MoE v1 MoE block semantics, written out: softmax gate, top-k, optional renorm,
    weighted sum of expert outputs, plus the shared experts."""
    h = x.reshape(-1, x.shape[-1])
    scores = torch.softmax(h @ sd[f"{p}.gate.weight"].T, dim=-1)
    w, idx = torch.topk(scores, cfg["num_experts_per_tok"], dim=-1)
    if cfg["norm_topk_prob"]:
        w = w / w.sum(-1, keepdim=True)
    y = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            y[t] += w[t, j] * _swiglu(h[t], sd[f"{p}.experts.{e}.gate_proj.weight"],
                                      sd[f"{p}.experts.{e}.up_proj.weight"], sd[f"{p}.experts.{e}.down_proj.weight"])
    y = y + _swiglu(h, sd[f"{p}.shared_experts.gate_proj.weight"], sd[f"{p}.shared_experts.up_proj.weight"],
                    sd[f"{p}.shared_experts.down_proj.weight"])
    return y.reshape(x.shape)


@pytest.mark.parametrize("norm", [False, True])
def test_deepseek_v1_block_matches_reference(norm: bool) -> None:
    cfg = {**V1_CONFIG, "norm_topk_prob": norm}
    sd = v1_state_dict(cfg)
    model = build_model(cfg, sd)
    assert model_family(model) == V1_FAMILY
    blocks = find_moe_blocks(model)
    assert [b.layer for b in blocks] == [1, 2]
    assert all(b.norm_topk_prob is norm and b.top_k == 3 and b.family == V1_FAMILY for b in blocks)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for b in blocks:
            ref = v1_moe_reference(x, sd, f"model.layers.{b.layer}.mlp", cfg)
            torch.testing.assert_close(b.module(x), ref, atol=1e-5, rtol=1e-5)
        dense = model.model.layers[0].mlp  # first_k_dense_replace layer stays a plain MLP
        p = "model.layers.0.mlp"
        ref = _swiglu(x, sd[f"{p}.gate_proj.weight"], sd[f"{p}.up_proj.weight"], sd[f"{p}.down_proj.weight"])
        torch.testing.assert_close(dense(x), ref, atol=1e-5, rtol=1e-5)


def test_deepseek_v1_checkpoint_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = tmp_path / "v1"
    src.mkdir()
    sd = v1_state_dict(V1_CONFIG, seed=3)
    (src / "config.json").write_text(json.dumps(V1_CONFIG))
    save_file(sd, str(src / "model.safetensors"))
    dst = convert_checkpoint(src, tmp_path / "converted")
    model = load_model(dst)
    assert model_family(model) == V1_FAMILY
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, build_model(V1_CONFIG, sd)(ids).logits)


def test_trained_v1_marker_is_recognised() -> None:
    """scripts/train_tiny_moe.py marks its DeepSeek-MoE v1 stand-in with config.romer_family."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("qwen2_moe")
    cfg.romer_family = "deepseek-moe"
    assert model_family(AutoModelForCausalLM.from_config(cfg)) == V1_FAMILY
