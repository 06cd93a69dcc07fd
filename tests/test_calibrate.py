"""`calibrate`, the calibrated model directory and `hil calibrate` on small random checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import romer.calibrate as rc
from romer.adapters import load_model, load_tokenizer, tiny_config
from romer.calibrate import CalibrateConfig, calibrate
from romer.calibrated import install_romer, load_calibrated, read_meta
from romer.replace import ReplaceConfig, ReplacementPlan, apply_replacement
from romer.router_calib import RouterCalibConfig, RouterCalibration

from .test_eval import byte_tokenizer

TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void.\n" * 8
EVAL = "And God said, Let there be light: and there was light. And God saw the light, that it was good.\n" * 8


def make_dir(family: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp(f"{family}-rand")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=256, num_experts=8, top_k=2)
                                     ).save_pretrained(str(d))
    byte_tokenizer(d)
    (d.parent / "calib.txt").write_text(TEXT)
    (d.parent / "eval.txt").write_text(EVAL)
    return d


@pytest.fixture(scope="module", params=["olmoe", "qwen2_moe"])
def tiny_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dir(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def olmoe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dir("olmoe", tmp_path_factory)


def small(d: Path, **kw: object) -> CalibrateConfig:
    base = dict(model=d, noise="pcm@16", calib_text=d.parent / "calib.txt", seeds=2, calib_tokens=512,
                eval_tokens=512, max_length=64, stride=64, batch_size=4,
                replace=ReplaceConfig(select="bottom", m=2, gate=False), router=RouterCalibConfig(mode="expert"))
    base.update(kw)
    return CalibrateConfig(**base)  # type: ignore[arg-type]


def test_table_and_saved_model_reloads_to_same_outputs(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cal"
    res = calibrate(small(tiny_dir, seeds=1, out=out, eval_text=tiny_dir.parent / "eval.txt"))
    assert set(res.conditions) == {"clean", "noisy", "replace", "router", "romer", "digital_router"}
    assert all(len(c.ppl) == 1 for c in res.conditions.values())
    assert res.conditions["romer"].reduction_pct is not None
    meta = read_meta(out)
    # default: a splittable shared expert (Qwen2-MoE) gets averaged shared-expert replicas, else averaged hot experts
    expected = "average_shared" if tiny_dir.name.startswith("qwen2_moe") else "average"
    assert meta["replacement"]["strategy"] == expected and meta["noise_model"]["name"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    json.loads(res.to_json())

    # reference: original model, replaced in memory, hooks installed from the returned calibration
    plan = ReplacementPlan.from_dict(res.plan)  # type: ignore[arg-type]
    calib = RouterCalibration.from_dict(res.router_calibration)  # type: ignore[arg-type]
    ref_model = load_model(tiny_dir)
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with apply_replacement(ref_model, plan), install_romer(ref_model, plan, calib), torch.no_grad():
        ref = ref_model(input_ids=x).logits
    loaded = load_calibrated(out)
    assert loaded.romer_hooks.handles
    with torch.no_grad():
        got = loaded(input_ids=x).logits
    torch.testing.assert_close(got, ref)
    with torch.no_grad():
        plain = load_model(tiny_dir)(input_ids=x).logits
    assert not torch.allclose(plain, got)  # the calibration is really active


def test_calibration_never_reads_the_evaluation_text(olmoe_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_dir = olmoe_dir
    with pytest.raises(ValueError, match="must not be the evaluation text"):
        small(tiny_dir, eval_text=tiny_dir.parent / "calib.txt")
    seen: list[str] = []
    real = rc.tokenize_file

    def spy(path: str | Path, tokenizer: object, max_tokens: int | None = None) -> torch.Tensor:
        seen.append(Path(path).name)
        return real(path, tokenizer, max_tokens)

    monkeypatch.setattr(rc, "tokenize_file", spy)
    no_eval = calibrate(small(tiny_dir, seeds=1, conditions=("noisy",)))
    assert seen == ["calib.txt"]
    other = tmp_path / "other_eval.txt"
    other.write_text("Sentinel sentinel SENTINEL zzz qqq.\n" * 20)
    with_eval = calibrate(small(tiny_dir, seeds=1, eval_text=other, conditions=("noisy",)))
    assert seen[1:] == ["calib.txt", "other_eval.txt"]
    assert with_eval.plan == no_eval.plan and with_eval.router_calibration == no_eval.router_calibration


def test_held_out_mode_and_cli(olmoe_dir: Path, tmp_path: Path) -> None:
    from hil.cli import app

    tiny_dir = olmoe_dir
    res = calibrate(small(tiny_dir, seeds=1, calib_mode="held_out", eval_text=tiny_dir.parent / "eval.txt",
                          conditions=("clean", "noisy", "romer")))
    assert res.calib_mode == "held_out" and set(res.conditions) == {"clean", "noisy", "romer"}
    with pytest.raises(ValueError, match="calib_seed"):
        small(tiny_dir, calib_seed=1)

    out, js = tmp_path / "cli", tmp_path / "r.json"
    args = ["calibrate", "--model", str(tiny_dir), "--noise", "pcm@8", "--calib-text",
            str(tiny_dir.parent / "calib.txt"), "--out", str(out), "--seeds", "1", "--eval-text",
            str(tiny_dir.parent / "eval.txt"), "--json", str(js), "--calib-tokens", "256", "--eval-tokens", "256",
            "--window", "64", "--m", "1", "--router-mode", "expert"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "romer" in r.output and (out / "romer.json").is_file() and json.loads(js.read_text())["conditions"]
    # `hil eval` evaluates the calibrated directory like any other model
    r = CliRunner().invoke(app, ["eval", "--model", str(out), "--noise", "pcm@8", "--text",
                                 str(tiny_dir.parent / "eval.txt"), "--seeds", "1", "--window", "64",
                                 "--stride", "64", "--max-tokens", "256"])
    assert r.exit_code == 0, r.output
    assert load_tokenizer(out) is not None
    bad = CliRunner().invoke(app, args[:4] + ["nosuch"] + args[5:])
    assert bad.exit_code == 2 and "error" in bad.output


def test_auto_router_mode_and_replacement_gate(olmoe_dir: Path) -> None:
    res = calibrate(small(olmoe_dir, seeds=1, conditions=("noisy",), router=RouterCalibConfig(),
                          replace=ReplaceConfig(select="bottom", m=2)))
    rc_cfg = res.router_calibration["config"]  # type: ignore[index]
    assert rc_cfg["selected_by"] == "auto"
    scores = rc_cfg["calib_nll"]
    assert set(scores) == set(RouterCalibConfig().candidates)
    assert scores[res.router_calibration["mode"]] == min(scores.values())  # type: ignore[index]
    gate = res.plan["config"]["gate_calib_nll"]  # type: ignore[index]
    kept = bool(res.plan["layers"])  # type: ignore[index]
    assert kept == (gate["with"] < gate["without"])
