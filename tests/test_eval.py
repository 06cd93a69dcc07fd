"""Perplexity recipe, `evaluate` and `hil eval` on tiny checkpoints (plus trained ones when present)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from romer.adapters import tiny_config
from romer.evaluate import EvalConfig, evaluate
from romer.perplexity import WindowConfig, perplexity, windows

REPO = Path(__file__).resolve().parents[1]
TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void.\n" * 6


def byte_tokenizer(path: Path) -> None:
    """A 256-token byte-level tokenizer saved next to a model (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(path))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("olmoe-rand")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("olmoe", vocab_size=256)).save_pretrained(str(d))
    byte_tokenizer(d)
    (d.parent / "text.txt").write_text(TEXT)
    return d


def test_windows_score_every_token_once() -> None:
    for n, L, s in [(10, 4, 2), (10, 4, 4), (11, 5, 3), (3, 8, 8)]:
        scored = []
        for b, e, trg in windows(n, L, s):
            assert e - b <= L and trg <= e - b
            scored.extend(range(e - trg, e))
        assert scored == list(range(n))


def test_sliding_window_matches_manual_hf_computation() -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2_moe")).eval()
    ids = torch.randint(0, 64, (23,), generator=torch.Generator().manual_seed(1))
    L, stride = 8, 3
    nll, count, prev_end = 0.0, 0, 0  # the HF recipe, window by window, loss from the model itself
    for begin in range(0, ids.numel(), stride):
        end = min(begin + L, ids.numel())
        trg = end - prev_end
        x = ids[begin:end].unsqueeze(0)
        labels = x.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            loss = model(input_ids=x, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        nll += float(loss) * n
        count += n
        prev_end = end
        if end == ids.numel():
            break
    for bs in (1, 3, 16):
        res = perplexity(model, ids, WindowConfig(max_length=L, stride=stride, batch_size=bs))
        assert res.n_tokens == count == ids.numel() - 1
        assert res.nll == pytest.approx(nll, rel=1e-5)


def test_evaluate_clean_vs_noisy(tiny_dir: Path, tmp_path: Path) -> None:
    cfg = EvalConfig(model=tiny_dir, noise="gaussian:0.3", text=tiny_dir.parent / "text.txt", seeds=2,
                     max_length=64, stride=32, max_tokens=400, heatmap=tmp_path / "load")
    res = evaluate(cfg)
    assert res.family == "olmoe" and res.n_tokens == 399
    assert len(res.seeds) == 2 and res.seeds[0].ppl != res.seeds[1].ppl
    assert 0.0 < res.overlap_mean < 1.0
    assert res.noisy_ppl_std > 0
    assert (tmp_path / "load_clean.png").exists() and (tmp_path / "load_noisy.png").exists()
    d = json.loads(res.to_json(tmp_path / "r.json"))
    assert d["clean_load"]["layers"][0]["tokens"] > 0
    # zero noise: identical to clean
    zero = evaluate(EvalConfig(model=tiny_dir, noise="gaussian:0", text=tiny_dir.parent / "text.txt", seeds=1,
                               max_length=64, stride=32, max_tokens=200, parts=("all",)))
    assert zero.seeds[0].ppl == pytest.approx(zero.clean_ppl, rel=1e-6) and zero.overlap_mean == 1.0


def test_cli_eval(tiny_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hil.cli import app

    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(tiny_dir), "--noise", "pcm@4", "--text", str(tiny_dir.parent / "text.txt"),
            "--seeds", "2", "--window", "64", "--stride", "64", "--max-tokens", "300", "--json", str(out),
            "--parts", "experts,router", "--backup", "disk"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "clean" in r.output and "noisy mean" in r.output
    assert json.loads(out.read_text())["config"]["parts"] == ["experts", "router"]
    bad = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "nope"), "--text", str(out)])
    assert bad.exit_code == 2 and "error" in bad.output
    bad = CliRunner().invoke(app, ["eval", "--model", str(tiny_dir), "--noise", "nosuch", "--text", str(out)])
    assert bad.exit_code == 2 and "nosuch" in bad.output


TRAINED = [REPO / "data" / "models" / n for n in ("olmoe-tiny", "qwen2moe-tiny", "deepseekmoe-tiny")]


@pytest.mark.slow
@pytest.mark.skipif(not any((p / "config.json").exists() for p in TRAINED), reason="no trained tiny checkpoints")
def test_strong_pcm_noise_unbalances_trained_model() -> None:
    """FINDINGS: at PCM ×16 the load CV rises and top-k overlap with clean routing drops."""
    model_dir = next(p for p in TRAINED if (p / "config.json").exists())
    text = REPO / "data" / "text" / "eval.txt"
    res = evaluate(EvalConfig(model=model_dir, noise="pcm@16", text=text, seeds=2, max_length=256, stride=256,
                              max_tokens=8192, parts=("experts", "router", "shared")))
    assert res.noisy_cv_mean > res.clean_load.cv
    assert res.overlap_mean < 0.9
    assert res.noisy_ppl_mean > res.clean_ppl


def test_uncached_dataset_is_a_clean_error() -> None:
    import importlib.util

    from romer.perplexity import cached_dataset_text

    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets installed: the cache may hold the data set")
    with pytest.raises(RuntimeError, match="datasets"):
        cached_dataset_text("wikitext", "wikitext-2-raw-v1")
