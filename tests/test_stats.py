"""Load statistics from router hooks: hand-made routing, padding mask, overlap, heatmap, JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from romer.adapters import MoEBlock, tiny_config
from romer.stats import LayerLoad, RoutingRecorder, overlap, plot_load_heatmap, topk_overlap_sets


class FixedRouter(nn.Module):
    """Returns a given top-k routing for [B*T] tokens, like a transformers 5.x router."""

    def __init__(self, indices: torch.Tensor, num_experts: int) -> None:
        super().__init__()
        self.indices, self.num_experts, self.top_k = indices, num_experts, indices.shape[1]

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = h.reshape(-1, h.shape[-1]).shape[0]
        logits = torch.zeros(n, self.num_experts)
        return logits, torch.ones(n, self.top_k) / self.top_k, self.indices[:n]


def fixed_block(indices: torch.Tensor, num_experts: int = 4) -> MoEBlock:
    r = FixedRouter(indices, num_experts)
    return MoEBlock(layer=0, module=r, router=r, experts=r, shared=None, shared_gate=None,
                    num_experts=num_experts, top_k=indices.shape[1], norm_topk_prob=False, family="test")


def test_hand_made_routing_counts_and_metrics() -> None:
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3]])  # expert 0: 4, 1: 2, 2: 1, 3: 1
    b = fixed_block(idx)
    rec = RoutingRecorder(nn.Identity(), [b])
    with rec:
        out = b.router(torch.zeros(4, 8))
    assert torch.equal(out[2], idx)  # the hook does not replace the output
    s = rec.stats()
    layer = s.layers[0]
    assert layer.counts == [4, 2, 1, 1] and layer.tokens == 4
    c = np.array([4, 2, 1, 1.0])
    assert layer.cv == pytest.approx(c.std() / c.mean())
    assert layer.max_mean == pytest.approx(2.0) and layer.min_mean == pytest.approx(0.5)
    p = c / c.sum()
    assert layer.entropy == pytest.approx(-(p * np.log(p)).sum() / math.log(4))
    assert s.cv == pytest.approx(layer.cv)
    json.dumps(s.to_dict())  # JSON-serialisable


def test_uniform_load_has_zero_cv_and_full_entropy() -> None:
    layer = LayerLoad.from_counts(0, np.array([5, 5, 5, 5]), 10)
    assert layer.cv == 0.0 and layer.max_mean == 1.0 and layer.entropy == pytest.approx(1.0)


def test_padding_is_masked() -> None:
    idx = torch.tensor([[0, 1], [2, 3], [0, 1], [3, 2]])  # tokens of a [2, 2] batch
    b = fixed_block(idx)
    rec = RoutingRecorder(nn.Identity(), [b])
    with rec:
        rec.set_mask(torch.tensor([[1, 1], [1, 0]]))  # last token is padding
        b.router(torch.zeros(2, 2, 8))
    assert rec.stats().layers[0].counts == [2, 2, 1, 1]
    assert rec.topk(0).shape == (3, 2)


def test_overlap_sets_ignore_order() -> None:
    a = torch.tensor([[0, 1], [2, 3]])
    assert topk_overlap_sets(a, torch.tensor([[1, 0], [3, 2]])) == 1.0
    assert topk_overlap_sets(a, torch.tensor([[0, 2], [1, 0]])) == pytest.approx(0.25)


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_identical_models_overlap_one_and_hooks_do_not_change_outputs(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    with RoutingRecorder(model) as r1:
        out = r1.run(ids, mask)
    with RoutingRecorder(model) as r2:
        r2.run(ids, mask)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=0)
    ov = overlap(r1, r2)
    assert ov.mean == 1.0 and all(v == 1.0 for v in ov.per_layer.values())
    s = r1.stats()
    assert all(layer.tokens == 24 - 3 for layer in s.layers)
    assert all(sum(layer.counts) == 21 * 2 for layer in s.layers)
    png = plot_load_heatmap(s, tmp_path / "load.png")
    assert png.stat().st_size > 1000
    assert not r1._handles  # hooks removed on exit
