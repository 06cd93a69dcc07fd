"""Expert replacement: plans, exact copies before noise, independent noise per slot, routing hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from noise_fit.presets import resolve
from romer.adapters import find_moe_blocks, tiny_config
from romer.calibrated import install_romer
from romer.inject import InjectConfig, inject_noise
from romer.replace import (
    LayerPlan,
    ReplaceConfig,
    ReplacementPlan,
    apply_replacement,
    physical_counts,
    plan_replacement,
)
from romer.stats import RoutingRecorder

FAMILIES = ("olmoe", "qwen2_moe")


def tiny(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, num_experts=8, top_k=2)).eval()


def ids(n: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (2, n), generator=torch.Generator().manual_seed(seed))


def plan_for(strategy: str) -> ReplacementPlan:
    return ReplacementPlan(strategy, [LayerPlan(0, cold=[1, 5], source=[3, 3]), LayerPlan(1, cold=[0], source=[6])])


def test_plan_bottom_and_threshold() -> None:
    counts = {0: np.array([50, 1, 30, 80, 40, 2, 60, 37])}
    tokens, k = {0: 150}, {0: 2}
    p = plan_replacement(counts, tokens, k, ReplaceConfig(select="bottom", m=2))
    assert p.layers[0].cold == [1, 5] and p.layers[0].source == [3, 6]
    # uniform share k/E = 0.25 per token; threshold 0.5 -> share < 0.125 -> count < 18.75
    p = plan_replacement(counts, tokens, k, ReplaceConfig(select="threshold", threshold=0.5, m=8))
    assert p.layers[0].cold == [1, 5]
    p = plan_replacement(counts, tokens, k, ReplaceConfig(select="bottom", m=2, copies_per_expert=2))
    assert p.layers[0].source == [3, 3]
    assert ReplacementPlan.from_dict(p.to_dict()).to_dict() == p.to_dict()
    with pytest.raises(ValueError):
        ReplaceConfig(strategy="nope")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["copy", "split", "average"])
def test_replacement_keeps_shapes_and_copies_source_exactly(family: str, strategy: str) -> None:
    model = tiny(family)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with apply_replacement(model, plan_for(strategy)):
        assert {k: v.shape for k, v in model.state_dict().items()} == shapes
        b0 = find_moe_blocks(model)[0]
        for p in (b0.experts.gate_up_proj, b0.experts.down_proj):
            assert torch.equal(p[1], p[3]) and torch.equal(p[5], p[3])
        assert torch.equal(b0.router.weight[1], b0.router.weight[3]) == (strategy != "copy")
        # the copy computes exactly the source expert's function
        x = torch.randn(5, b0.experts.gate_up_proj.shape[-1])
        w = torch.ones(5, 1)
        out_src = b0.experts(x, torch.full((5, 1), 3), w)
        out_copy = b0.experts(x, torch.full((5, 1), 5), w)
        assert torch.equal(out_src, out_copy)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # restore is exact


def test_each_replica_slot_gets_its_own_noise_draw() -> None:
    model = tiny("olmoe")
    with apply_replacement(model, plan_for("average")):
        with inject_noise(model, resolve("pcm@4"), InjectConfig(parts=("experts",)), seed=3):
            gu = find_moe_blocks(model)[0].experts.gate_up_proj.detach().clone()
        clean = find_moe_blocks(model)[0].experts.gate_up_proj.detach()
        d1, d3 = gu[1] - clean[1], gu[3] - clean[3]
        assert not torch.allclose(gu[1], gu[3])
        assert abs(float(torch.corrcoef(torch.stack([d1.flatten(), d3.flatten()]))[0, 1])) < 0.2


@pytest.mark.parametrize("family", FAMILIES)
def test_averaged_replicas_equal_single_expert_without_noise(family: str) -> None:
    model = tiny(family)
    b0 = find_moe_blocks(model)[0]
    x = torch.randn(7, b0.experts.gate_up_proj.shape[-1])
    idx = torch.tensor([[3, 0]] * 4 + [[2, 4]] * 3)
    w = torch.rand(7, 2)
    ref = b0.experts(x, idx, w)
    plan = plan_for("average")
    with apply_replacement(model, plan), install_romer(model, plan, None):
        out = b0.experts(x, idx, w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_split_and_average_route_around_cold_slots(family: str) -> None:
    model = tiny(family)
    x = ids()
    outs = {}
    for strategy in ("split", "average"):
        plan = plan_for(strategy)
        with apply_replacement(model, plan), install_romer(model, plan, None), RoutingRecorder(model) as rec:
            with torch.no_grad():
                outs[strategy] = model(input_ids=x).logits
        c0 = physical_counts(rec.counts[0], plan.layer(0), strategy)
        assert not torch.isnan(outs[strategy]).any()
        if strategy == "split":  # the hot expert's tokens are dealt to its three replicas
            assert rec.counts[0][1] > 0 and rec.counts[0][5] > 0
            assert abs(int(rec.counts[0][1]) - int(rec.counts[0][3])) <= 1
        else:  # logical routing never picks a masked slot; every replica computes the group's tokens
            assert rec.counts[0][1] == 0 and rec.counts[0][5] == 0
            assert c0[1] == c0[3] == c0[5]
    torch.testing.assert_close(outs["split"], outs["average"], rtol=1e-4, atol=1e-5)  # copies are identical
