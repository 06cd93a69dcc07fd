"""average_shared: slices of the shared expert in cold slots, exact before noise, averaged after."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from noise_fit.presets import resolve
from romer.adapters import find_moe_blocks, tiny_config
from romer.calibrated import install_romer
from romer.inject import InjectConfig, inject_noise
from romer.replace import LayerPlan, ReplaceConfig, ReplacementPlan, apply_replacement, plan_replacement, shared_slices


def tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("qwen2_moe", num_experts=8, top_k=2)).eval()


def full_plan(model: torch.nn.Module, copies: int = 1) -> ReplacementPlan:
    n = shared_slices(find_moe_blocks(model)[0])
    cold = list(range(8 - n * copies, 8))
    return ReplacementPlan("average_shared", [LayerPlan(0, cold=cold, source=[-1] * len(cold),
                                                        shared_slice=[i % n for i in range(len(cold))])])


def test_slices_sum_to_shared_expert_and_shapes_kept() -> None:
    model = tiny()
    b = find_moe_blocks(model)[0]
    n = shared_slices(b)
    assert n >= 2
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = full_plan(model)
    x = torch.randn(9, b.experts.gate_up_proj.shape[-1])
    with apply_replacement(model, plan):
        assert {k: v.shape for k, v in model.state_dict().items()} == shapes
        idx = torch.tensor(plan.layers[0].cold).unsqueeze(0).expand(9, -1)
        slices = b.experts(x, idx, torch.ones(9, n))  # each slot computes one slice: their sum is the shared MLP
        torch.testing.assert_close(slices, b.shared[0](x), rtol=1e-5, atol=1e-6)
        with install_romer(model, plan, None):  # averaging identical instances: the function is unchanged
            torch.testing.assert_close(b.shared[0](x), slices, rtol=1e-5, atol=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("partial", [False, True])
def test_model_output_exact_before_noise_and_cold_slots_masked(partial: bool) -> None:
    model = tiny()
    x = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    plan = full_plan(model)
    if partial:  # one slice replicated: the others keep their single instance
        lp = plan.layers[0]
        plan = ReplacementPlan("average_shared", [LayerPlan(0, cold=lp.cold[:1], source=[-1], shared_slice=[1])])
    cold = plan.layers[0].cold
    masked = ReplacementPlan("average", [LayerPlan(0, cold=cold, source=[0] * len(cold))])  # same routing mask
    with apply_replacement(model, masked), install_romer(model, masked, None), torch.no_grad():
        ref = model(input_ids=x).logits  # exact copies of expert 0 averaged: the masked model's function
    with apply_replacement(model, plan), install_romer(model, plan, None) as hooks, torch.no_grad():
        out = model(input_ids=x).logits
        assert len(hooks.handles) == 2  # router mask + shared hook
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_averaging_lowers_shared_noise() -> None:
    model = tiny()
    b = find_moe_blocks(model)[0]
    x = torch.randn(64, b.experts.gate_up_proj.shape[-1])
    clean = b.shared[0](x).detach()
    plan = full_plan(model)
    errs = {"plain": [], "avg": []}
    for seed in range(4):
        with apply_replacement(model, plan), inject_noise(model, resolve("pcm@4"),
                                                          InjectConfig(parts=("experts", "shared")), seed=seed):
            with torch.no_grad():
                errs["plain"].append(float((b.shared[0](x) - clean).pow(2).mean()))
                with install_romer(model, plan, None):
                    errs["avg"].append(float((b.shared[0](x) - clean).pow(2).mean()))
    assert np.mean(errs["avg"]) < 0.8 * np.mean(errs["plain"])


def test_plan_average_shared() -> None:
    counts = {0: np.array([50, 1, 30, 80, 40, 2, 60, 37]), 1: np.array([10] * 8)}
    tokens, k = {0: 150, 1: 40}, {0: 2, 1: 2}
    cfg = ReplaceConfig(strategy="average_shared", select="bottom", m=3)  # m, select: not used
    p = plan_replacement(counts, tokens, k, cfg, n_slices={0: 2, 1: 0})
    assert p.layers[0].cold == [1, 5] and p.layers[0].shared_slice == [0, 1] and p.layers[0].source == [-1, -1]
    assert p.layers[1].cold == []
    assert ReplacementPlan.from_dict(p.to_dict()).to_dict() == p.to_dict()
    assert p.layers[0].groups() == {}


def test_default_plans_shared_replicas_only_where_the_shared_expert_splits() -> None:
    counts = {0: np.array([50, 1, 30, 80, 40, 2, 60, 37])}
    tokens, k = {0: 150}, {0: 2}
    p = plan_replacement(counts, tokens, k, ReplaceConfig(), n_slices={0: 2})
    assert p.strategy == "average_shared" and p.layers[0].cold == [1, 5]
    p = plan_replacement(counts, tokens, k, ReplaceConfig(shared_copies=2), n_slices={0: 2})
    assert p.layers[0].cold == [1, 5, 2, 7] and p.layers[0].shared_slice == [0, 1, 0, 1]
    for kw in ({}, {"n_slices": {0: 0}}):  # no splittable shared expert (OLMoE) or not given: plain average
        assert plan_replacement(counts, tokens, k, ReplaceConfig(), **kw).strategy == "average"
    assert plan_replacement(counts, tokens, k, ReplaceConfig(shared_replicas=False), n_slices={0: 2}).strategy \
        == "average"
    assert plan_replacement(counts, tokens, k, ReplaceConfig(strategy="split"), n_slices={0: 2}).strategy == "split"
