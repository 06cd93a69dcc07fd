#!/usr/bin/env python
"""Train the tiny MoE checkpoints shipped in ``data/models/`` (see docs/tiny_models.md).

Three families, each a real transformers 5.x class with the routing structure of the real model:

- ``olmoe``       -> ``olmoe-tiny``: OlmoeForCausalLM, 64 experts, top-8 (OLMoE-1B-7B).
- ``qwen2moe``    -> ``qwen2moe-tiny``: Qwen2MoeForCausalLM, 60 routed experts, top-4, one shared expert
                     of 4x the expert width with a sigmoid shared-expert gate (Qwen1.5-MoE-A2.7B).
- ``deepseekmoe`` -> ``deepseekmoe-tiny``: DeepSeek-MoE v1 mapped onto Qwen2MoeForCausalLM: 64 routed experts,
                     top-6, softmax without top-k renormalisation, 2 shared experts merged into one of 2x width,
                     shared-expert gate weight fixed at zero (sigmoid(0) = 0.5, trained with the gate frozen).

Training text: the ``train`` split of the KJV corpus (romer.textdata), byte-level BPE tokenizer trained on it.
Loss: next-token cross-entropy + a per-layer Switch load-balancing loss (E * sum_e f_e P_e for every layer,
averaged over layers), so that every layer is balanced on its own.

Usage::

    python scripts/train_tiny_moe.py --family all --steps 600 --threads 1 --out data/models
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from romer.textdata import build_split_texts, load_split, write_splits  # noqa: E402

FAMILIES: dict[str, str] = {"olmoe": "olmoe-tiny", "qwen2moe": "qwen2moe-tiny", "deepseekmoe": "deepseekmoe-tiny"}
EOS = "<|endoftext|>"
PAD = "<|pad|>"


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 60
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    balance_coef: float = 0.02  # per layer
    seed: int = 0
    threads: int = 2
    experts_implementation: str = "grouped_mm"
    eval_window: int = 128
    monitor_tokens: int = 16384
    log_every: int = 50


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE on ``text`` (deterministic), wrapped as a transformers fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = text.splitlines(keepends=True)
    chunk = 256
    tok.train_from_iterator(("".join(lines[i : i + chunk]) for i in range(0, len(lines), chunk)), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None, pad_token=PAD, model_max_length=256
    )


def encode_stream(tokenizer: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    """The whole text as one 1-D id stream (lines kept, the newline is a token)."""
    lines = text.splitlines(keepends=True)
    chunk = 512
    backend = tokenizer.backend_tokenizer  # no length warning, same ids as tokenizer(..., add_special_tokens=False)
    ids: list[int] = []
    for i in range(0, len(lines), chunk):
        ids.extend(backend.encode("".join(lines[i : i + chunk]), add_special_tokens=False).ids)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- models


def make_config(family: str, vocab_size: int, eos_id: int, pad_id: int, impl: str) -> transformers.PretrainedConfig:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        output_router_logits=False,
        router_aux_loss_coef=0.0,
        experts_implementation=impl,
    )
    if family == "olmoe":
        cfg = OlmoeConfig(intermediate_size=32, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, **common)
        cfg.romer_family = "olmoe"
    elif family == "qwen2moe":
        cfg = Qwen2MoeConfig(
            intermediate_size=128,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=128,
            num_experts=60,
            num_experts_per_tok=4,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            qkv_bias=True,
            **common,
        )
        cfg.romer_family = "qwen2-moe"
    elif family == "deepseekmoe":
        cfg = Qwen2MoeConfig(
            intermediate_size=64,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=64,
            num_experts_per_tok=6,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            qkv_bias=False,
            **common,
        )
        cfg.romer_family = "deepseek-moe"
        cfg.romer_shared_expert_gate = "constant 0.5: shared_expert_gate.weight is zero and frozen (sigmoid(0))"
    else:
        raise ValueError(f"unknown family {family!r}")
    return cfg


def build_model(family: str, cfg: transformers.PretrainedConfig, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    cls = OlmoeForCausalLM if family == "olmoe" else Qwen2MoeForCausalLM
    model = cls(cfg)
    if family == "deepseekmoe":
        for layer in model.model.layers:
            gate = layer.mlp.shared_expert_gate
            with torch.no_grad():
                gate.weight.zero_()
            gate.weight.requires_grad_(False)
    return model


def moe_blocks(model: PreTrainedModel) -> list[torch.nn.Module]:
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "gate")]


# --------------------------------------------------------------------------- losses and metrics


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-style f.P balancing loss computed for each layer separately, then summed over layers.

    For one layer with E experts: E * sum_e f_e * P_e, f_e the fraction of top-k slots sent to expert e,
    P_e the mean router probability of expert e. Equals 1 per layer when perfectly balanced.
    (transformers' own aux loss pools the tokens of all layers, which lets single layers collapse.)
    """
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        num_experts = probs.shape[-1]
        top = torch.topk(probs, top_k, dim=-1).indices
        counts = torch.zeros(num_experts, device=probs.device).scatter_add_(
            0, top.reshape(-1), torch.ones(top.numel(), device=probs.device)
        )
        frac = counts / top.numel()
        losses.append(num_experts * (frac * probs.mean(dim=0)).sum())
    return torch.stack(losses).sum()


@torch.no_grad()
def perplexity(model: PreTrainedModel, ids: torch.Tensor, window: int, batch: int = 32) -> tuple[float, int]:
    """Perplexity over non-overlapping windows of ``window`` tokens (each window scored independently;
    its first token is context only). Returns (ppl, number of scored tokens). Tail shorter than a window dropped."""
    model.eval()
    n = (ids.numel() // window) * window
    blocks = ids[:n].view(-1, window)
    nll, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch):
        x = blocks[i : i + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        tgt = x[:, 1:]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum").item()
        count += tgt.numel()
    return math.exp(nll / count), count


@torch.no_grad()
def expert_load(model: PreTrainedModel, ids: torch.Tensor, window: int, batch: int = 32) -> list[dict[str, object]]:
    """Per-layer top-k selection counts per expert over non-overlapping windows of ``ids``."""
    model.eval()
    top_k = model.config.num_experts_per_tok
    n = (ids.numel() // window) * window
    blocks = ids[:n].view(-1, window)
    counts: list[torch.Tensor] | None = None
    for i in range(0, blocks.shape[0], batch):
        out = model(input_ids=blocks[i : i + batch], output_router_logits=True)
        layer_counts = [
            torch.bincount(torch.topk(lg.float(), top_k, dim=-1).indices.reshape(-1), minlength=lg.shape[-1])
            for lg in out.router_logits
        ]
        counts = layer_counts if counts is None else [a + b for a, b in zip(counts, layer_counts, strict=True)]
    assert counts is not None
    stats = []
    for layer, c in enumerate(counts):
        c = c.double()
        mean = c.mean()
        stats.append(
            {
                "layer": layer,
                "cv": round((c.std(unbiased=False) / mean).item(), 4),
                "min_over_mean": round((c.min() / mean).item(), 4),
                "max_over_mean": round((c.max() / mean).item(), 4),
                "dead_experts": int((c == 0).sum().item()),
                "counts": [int(v) for v in c.tolist()],
            }
        )
    return stats


# --------------------------------------------------------------------------- training


def lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    prog = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))


def train_one(
    family: str,
    tokenizer: PreTrainedTokenizerFast,
    train_ids: torch.Tensor,
    monitor_ids: torch.Tensor,
    s: TrainSettings,
) -> tuple[PreTrainedModel, dict[str, object]]:
    cfg = make_config(family, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, s.experts_implementation)
    model = build_model(family, cfg, s.seed)
    top_k = cfg.num_experts_per_tok
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{family}] {n_params / 1e6:.2f} M params, experts={cfg.num_experts} top-{top_k}", flush=True)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(s.seed + 1)
    max_start = train_ids.numel() - s.seq_len - 1
    t0 = time.perf_counter()
    history = []
    ce_avg = bal_avg = 0.0
    for step in range(s.steps):
        model.train()
        starts = torch.randint(0, max_start, (s.batch_size,), generator=gen)
        batch = torch.stack([train_ids[i : i + s.seq_len + 1] for i in starts.tolist()])
        x, y = batch[:, :-1], batch[:, 1:]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s)
        out = model(input_ids=x, output_router_logits=True)
        ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), y.reshape(-1))
        bal = per_layer_balance_loss(out.router_logits, top_k)
        loss = ce + s.balance_coef * bal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        ce_avg = ce.item() if step == 0 else 0.95 * ce_avg + 0.05 * ce.item()
        bal_avg = bal.item() if step == 0 else 0.95 * bal_avg + 0.05 * bal.item()
        if (step + 1) % s.log_every == 0 or step == s.steps - 1:
            el = time.perf_counter() - t0
            line = f"[{family}] step {step + 1}/{s.steps} ce {ce_avg:.3f} bal {bal_avg:.3f} {el:.0f}s"
            if (step + 1) % (s.log_every * 4) == 0 or step == s.steps - 1:
                ppl, _ = perplexity(model, monitor_ids, s.eval_window)
                line += f" monitor-ppl {ppl:.1f}"
                history.append({"step": step + 1, "train_ce": round(ce_avg, 4), "monitor_ppl": round(ppl, 2)})
            print(line, flush=True)
    wall = time.perf_counter() - t0
    model.eval()
    info: dict[str, object] = {
        "family": family,
        "params": n_params,
        "train_wall_s": round(wall, 1),
        "final_train_ce_ema": round(ce_avg, 4),
        "final_balance_loss_ema": round(bal_avg, 4),
        "history": history,
    }
    return model, info


def save_bf16_checkpoint(model: PreTrainedModel, out_dir: Path) -> None:
    """save_pretrained, then store the tensors as bfloat16 (as the real checkpoints are).

    config.json keeps dtype float32, so from_pretrained loads them as float32; bf16 -> fp32 is exact, so the
    loaded model is exactly the bf16-rounded trained model and all reported metrics are measured on it.
    """
    model.save_pretrained(out_dir)
    for path in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k).to(torch.bfloat16).contiguous() for k in f.keys()}
        save_file(tensors, str(path), metadata=metadata)
        path.chmod(0o644)


def config_summary(cfg: transformers.PretrainedConfig) -> dict[str, object]:
    keys = [
        "model_type",
        "romer_family",
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_experts",
        "num_experts_per_tok",
        "norm_topk_prob",
        "intermediate_size",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "tie_word_embeddings",
    ]
    return {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=[*FAMILIES, "all"], default="all")
    ap.add_argument("--steps", type=int, default=TrainSettings.steps)
    ap.add_argument("--out", type=Path, default=REPO / "data" / "models")
    ap.add_argument("--text-dir", type=Path, default=REPO / "data" / "text")
    ap.add_argument("--seed", type=int, default=TrainSettings.seed)
    ap.add_argument("--threads", type=int, default=TrainSettings.threads)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--balance-coef", type=float, default=TrainSettings.balance_coef)
    ap.add_argument("--lr", type=float, default=TrainSettings.lr)
    ap.add_argument("--experts-implementation", default=TrainSettings.experts_implementation)
    ap.add_argument("--write-splits", action="store_true", help="(re)write data/text/{calib,eval}.txt + splits.json")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    s = TrainSettings(
        steps=args.steps,
        seed=args.seed,
        threads=args.threads,
        balance_coef=args.balance_coef,
        lr=args.lr,
        experts_implementation=args.experts_implementation,
    )
    if args.write_splits or not (args.text_dir / "splits.json").is_file():
        texts = write_splits(args.text_dir)
    else:
        texts = build_split_texts()
        for name in ("calib", "eval"):
            if load_split(name, args.text_dir) != texts[name]:
                raise SystemExit(f"{name}.txt differs from the KJV package; rerun with --write-splits")
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(texts["train"], args.vocab)
    train_ids = encode_stream(tokenizer, texts["train"])
    calib_ids = encode_stream(tokenizer, texts["calib"])
    eval_ids = encode_stream(tokenizer, texts["eval"])
    print(
        f"tokenizer: vocab {len(tokenizer)}, train {train_ids.numel()} tok, calib {calib_ids.numel()}, "
        f"eval {eval_ids.numel()} ({time.perf_counter() - t0:.1f}s)",
        flush=True,
    )
    families = list(FAMILIES) if args.family == "all" else [args.family]
    for family in families:
        model, info = train_one(family, tokenizer, train_ids, calib_ids[: s.monitor_tokens], s)
        out_dir = args.out / FAMILIES[family]
        out_dir.mkdir(parents=True, exist_ok=True)
        save_bf16_checkpoint(model, out_dir)
        tokenizer.save_pretrained(out_dir)
        # reload through the normal offline path: everything reported is measured on the shipped files
        loaded = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True)
        loaded.eval()
        tok2 = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
        assert tok2("In the beginning")["input_ids"] == tokenizer("In the beginning")["input_ids"]
        ppl, n_tok = perplexity(loaded, eval_ids, s.eval_window)
        load = expert_load(loaded, calib_ids, s.eval_window)
        size = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
        info.update(
            {
                "name": FAMILIES[family],
                "class": type(loaded).__name__,
                "config": config_summary(loaded.config),
                "settings": asdict(s),
                "steps": s.steps,
                "seed": s.seed,
                "tokens_seen": s.steps * s.batch_size * s.seq_len,
                "tokenizer": {
                    "type": "byte-level BPE (tokenizers)",
                    "vocab_size": len(tokenizer),
                    "trained_on": "train",
                },
                "train_tokens": int(train_ids.numel()),
                "eval": {
                    "split": "eval",
                    "file": "data/text/eval.txt",
                    "method": f"non-overlapping windows of {s.eval_window} tokens, each scored independently "
                    "(first token of a window is context only), tail shorter than a window dropped",
                    "scored_tokens": n_tok,
                    "perplexity": round(ppl, 3),
                },
                "calib_load": {
                    "split": "calib",
                    "file": "data/text/calib.txt",
                    "method": f"top-{loaded.config.num_experts_per_tok} selections per expert over non-overlapping "
                    f"windows of {s.eval_window} tokens; cv = std/mean (population std)",
                    "tokens": int((calib_ids.numel() // s.eval_window) * s.eval_window),
                    "max_cv": max(layer["cv"] for layer in load),
                    "per_layer": load,
                },
                "safetensors_bytes": size,
                "storage_dtype": "bfloat16 (loaded as float32)",
                "versions": {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "python": platform.python_version(),
                },
            }
        )
        (out_dir / "train_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        cvs = ", ".join(f"{layer['cv']:.3f}" for layer in load)
        print(
            f"[{family}] saved {out_dir} ({size / 1e6:.1f} MB), eval ppl {ppl:.2f}, calib load CV per layer [{cvs}]",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
