"""The closed loop, end to end through the TCP transport, on a small random MoE model.

The model is random (fast), so perplexities mean nothing here; the tests check the loop's
behaviour: placement, programming through the driver, read-back into the weights, ROMER
reprogramming only the replaced experts, the run file, and resume without reprogramming.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hil.deploy import DeployConfig, DeployError, run_deploy
from hil.profile import ChipProfile
from hil.sim.chip import SimChip, chip_truth
from hil.sim.device import SimDevice
from hil.sim.server import FaultPlan, SimTCPServer
from romer.replace import ReplaceConfig


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from romer.adapters import tiny_config

    d = tmp_path_factory.mktemp("model")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = Path("data/text/calib.txt").read_text()[:50_000]
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    torch.manual_seed(0)
    cfg = tiny_config("qwen2_moe", vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_experts=8, top_k=2,
                      moe_intermediate=16)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


PROFILE = ChipProfile(tiles=4, rows=128, cols=128, block_max_cells=4096)


def _cfg(model: Path, out: Path, device: str, **kw) -> DeployConfig:
    base = dict(model=str(model), device=device, out=str(out), calib_tokens=1024, eval_tokens=1024, max_length=128,
                stride=128, batch_size=4, rounds=1, sim_truth="pcm-chip@4", timeout_s=2.0)
    base["replace"] = ReplaceConfig(strategy="average", select="bottom", m=2, gate=False)
    base.update(kw)
    return DeployConfig(**base)


def _server(seed: int = 5) -> SimTCPServer:
    return SimTCPServer(SimDevice(SimChip(PROFILE, chip_truth("pcm-chip@4"), seed=seed)))


def test_loop_end_to_end_over_tcp(tiny_model, tmp_path) -> None:
    with _server() as srv:
        res = run_deploy(_cfg(tiny_model, tmp_path / "run.h5", f"sim:127.0.0.1:{srv.port}"))
        chip = srv.device.chip
    r0, r1 = res.rounds
    # 2 layers x 8 experts x (gate, up, down) matrices of 16x32 or 32x16, each W+ and W-
    assert r0.blocks_programmed == 2 * 8 * 3 * 2
    assert r0.verified_fraction > 0.95 and 0 < r0.weight_rel_error < 1.0
    # ROMER: bottom-2 experts per layer replaced; only their blocks are reprogrammed
    assert r1.replaced == 4 and r1.blocks_programmed == 4 * 3 * 2
    assert np.isfinite([res.clean_ppl, r0.ppl, r1.ppl]).all()
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f.attrs["complete"]
        placed = len(f["placement/tile"])
        assert placed == r0.blocks_programmed
        assert f["rounds/0/program_done"][()].all() and f["rounds/1/program_done"][()].sum() == r1.blocks_programmed
        m = f["rounds/0/measured"][()]
        assert not np.isnan(m).any() and f["rounds/0/measured"].attrs["units"] == "uS"
        metrics = json.loads(f["rounds/1"].attrs["metrics"])
        # the model has a shared expert twice an expert's width: its two slices are replicated (average_shared)
        assert metrics["romer"]["plan"]["strategy"] == "average_shared"
        # what the run file says was measured is what the chip holds (read at the same instant)
        t0 = int(f["placement/tile"][0]), int(f["placement/row0"][0]), int(f["placement/col0"][0])
        assert f["rounds/1/targets"][0] == pytest.approx(float(chip.target[t0]), abs=1e-4)


def test_model_that_does_not_fit_is_emulated_and_reported(tiny_model, tmp_path) -> None:
    small = ChipProfile(tiles=1, rows=64, cols=64, block_max_cells=1024)
    with SimTCPServer(SimDevice(SimChip(small, chip_truth("pcm-chip@4"), seed=1))) as srv:
        res = run_deploy(_cfg(tiny_model, tmp_path / "run.h5", f"sim:127.0.0.1:{srv.port}", rounds=0,
                              noise="pcm@4"))
    assert res.placement["overflow_tensors"]  # something stayed off the chip
    assert res.placement["tiles_used"] == 1
    assert res.emulated_ppl is not None


def test_lost_connection_mid_deployment_resumes_without_reprogramming(tiny_model, tmp_path) -> None:
    with _server() as srv:
        srv.faults = FaultPlan(drop_at=set(range(12, 40)))  # the link dies during round-0 programming
        with pytest.raises(Exception, match="failed after"):
            run_deploy(_cfg(tiny_model, tmp_path / "run.h5", f"sim:127.0.0.1:{srv.port}", rounds=0))
        with h5py.File(tmp_path / "run.h5", "r") as f:
            done = f["rounds/0/program_done"][()].astype(bool)
            place = {k: f[f"placement/{k}"][()] for k in ("tile", "row0", "col0", "nrows", "ncols")}
        assert 0 < done.sum() < done.size
        srv.faults = None
        touched = np.zeros((PROFILE.tiles, PROFILE.rows, PROFILE.cols), bool)
        orig = srv.device.chip.program

        def counting(region, targets, settings):  # type: ignore[no-untyped-def]
            sel = ~np.isnan(np.asarray(targets)).reshape(region.nrows, region.ncols)
            touched[region.tile, region.row0:region.row0 + region.nrows, region.col0:region.col0 + region.ncols] |= sel
            return orig(region, targets, settings)

        srv.device.chip.program = counting  # type: ignore[method-assign]
        res = run_deploy(_cfg(tiny_model, tmp_path / "run.h5", f"sim:127.0.0.1:{srv.port}", rounds=0, resume=True))
    for b in np.flatnonzero(done):  # blocks verified before the link died were not programmed again
        t, r0, c0, nr, nc = (int(place[k][b]) for k in ("tile", "row0", "col0", "nrows", "ncols"))
        assert not touched[t, r0:r0 + nr, c0:c0 + nc].any()
    assert touched.any()  # ... while the rest was (or was answered from the device's transaction cache)
    assert res.rounds[0].blocks_programmed == done.size


def test_bad_input(tiny_model, tmp_path) -> None:
    with pytest.raises(DeployError, match="same file"):
        run_deploy(_cfg(tiny_model, tmp_path / "r.h5", "sim", eval_text="data/text/calib.txt"))
    with pytest.raises(DeployError, match="does not exist"):
        run_deploy(_cfg(tiny_model, tmp_path / "nope" / "r.h5", "sim"))
    (tmp_path / "r.h5").write_bytes(b"keep me")
    with pytest.raises(DeployError, match="already exists"):
        run_deploy(_cfg(tiny_model, tmp_path / "r.h5", "sim"))
    assert (tmp_path / "r.h5").read_bytes() == b"keep me"


def test_replacement_gate_predicts_with_the_noise_model_before_touching_the_chip(tiny_model, tmp_path) -> None:
    with _server() as srv:
        res = run_deploy(_cfg(tiny_model, tmp_path / "run.h5", f"sim:127.0.0.1:{srv.port}", noise="pcm@4",
                              replace=ReplaceConfig(strategy="average", select="bottom", m=2, gate=True)))
    with h5py.File(tmp_path / "run.h5", "r") as f:
        info = json.loads(f["rounds/1"].attrs["metrics"])["romer"]
    nll = info["gate_calib_nll"]
    assert nll["without"] > 0 and nll["with"] > 0
    kept = nll["with"] < nll["without"]
    assert res.rounds[1].replaced == (4 if kept else 0)
    assert res.rounds[1].blocks_programmed == (24 if kept else 0)  # a gated-off plan reprograms nothing
