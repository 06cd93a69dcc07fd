"""Router calibration: exact re-routing, identity when clean == noisy, fitted maps, padding excluded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from noise_fit.presets import resolve
from romer.adapters import find_moe_blocks, tiny_config
from romer.calibrate import clean_logit_quantiles, fit_router_calibration, token_batches
from romer.calibrated import install_romer
from romer.inject import InjectConfig, inject_noise
from romer.router_calib import LayerAffine, LogitRecorder, RouterCalibConfig, RouterCalibration, fit_layer, route
from romer.stats import RoutingRecorder

FAMILIES = ("olmoe", "qwen2_moe")


def tiny(family: str, seed: int = 0, **kw: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, num_experts=8, top_k=2, **kw)).eval()


def batches(n: int = 256, seed: int = 1) -> list:
    x = torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(seed))
    return token_batches(x, 48, 4)  # last batch padded


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("norm", [False, True])
def test_route_matches_the_routers_own_topk(family: str, norm: bool) -> None:
    model = tiny(family, norm_topk_prob=norm)
    b = find_moe_blocks(model)[0]
    h = torch.randn(33, b.router.weight.shape[1])
    logits, w, idx = b.router(h)
    w2, idx2 = route(logits, b.top_k, b.norm_topk_prob)
    assert torch.equal(idx, idx2) and torch.equal(w, w2)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["layer", "expert", "expert_keep_scale", "auto"])
def test_identity_when_clean_and_noisy_coincide(family: str, mode: str) -> None:
    model = tiny(family)
    blocks = find_moe_blocks(model)
    cfg = RouterCalibConfig(mode=mode)
    bs = batches()
    clean_q = clean_logit_quantiles(model, blocks, bs, cfg)
    calib = fit_router_calibration(model, blocks, bs, clean_q, cfg)
    assert all(a.identity for a in calib.layers.values())  # "auto" too: never reshuffles a noise-free model
    x = bs[0][0]
    with RoutingRecorder(model) as r0, torch.no_grad():
        ref = model(input_ids=x).logits
    with install_romer(model, None, calib) as hooks, RoutingRecorder(model) as r1, torch.no_grad():
        assert hooks.handles == []  # nothing to do: no hook at all
        out = model(input_ids=x).logits
    assert torch.equal(ref, out) and torch.equal(r0.topk(0), r1.topk(0))
    # a zero-noise injection (exact up to float rounding) keeps routing and gives a near-identity map
    with inject_noise(model, resolve("gaussian:0"), InjectConfig(parts=("experts", "router")), seed=0):
        calib0 = fit_router_calibration(model, blocks, bs, clean_q, cfg)
    for a in calib0.layers.values():
        np.testing.assert_allclose(a.scale, 1.0, atol=1e-5)
        np.testing.assert_allclose(a.shift, 0.0, atol=1e-5)


def test_fit_recovers_a_known_affine_distortion() -> None:
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(4000, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5, 1.0]) + torch.tensor([0.0, 1.0, -1.0, 2.0])
    noisy = clean * torch.tensor([0.5, 2.0, 1.0, 3.0]) + torch.tensor([1.0, -1.0, 0.5, 0.0])
    cfg = RouterCalibConfig(mode="expert")
    q = np.quantile(clean.double().numpy(), cfg.quantiles, axis=0).T
    a = fit_layer(0, noisy, q, cfg)
    np.testing.assert_allclose(a.scale, [2.0, 0.5, 1.0, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(np.array(a.scale) * [1.0, -1.0, 0.5, 0.0] + a.shift, 0.0, atol=1e-6)
    lay = fit_layer(0, clean * 3.0, q, RouterCalibConfig(mode="layer"))
    np.testing.assert_allclose(lay.scale, 1 / 3, rtol=1e-6)
    keep = fit_layer(0, noisy, q, RouterCalibConfig(mode="expert_keep_scale"))
    np.testing.assert_allclose(np.mean(keep.scale), 1.0)  # the layer's overall (noisy) scale is kept
    np.testing.assert_allclose(np.array(keep.scale) / np.array(a.scale), 1 / np.mean(a.scale))
    skip = fit_layer(0, noisy, q, cfg, skip={1})
    assert skip.scale[1] == 1.0 and skip.shift[1] == 0.0


def test_reference_free_keeps_the_layer_scale() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5000, 6, generator=g) * torch.tensor([1.0, 2.0, 3.0, 1.0, 0.5, 1.5]) + 3.0
    cfg = RouterCalibConfig(mode="reference_free")
    a = fit_layer(0, z, None, cfg)
    z2 = z * torch.tensor(a.scale, dtype=torch.float32) + torch.tensor(a.shift, dtype=torch.float32)
    lo, hi = np.quantile(z.numpy(), cfg.ipr, axis=0)
    lo2, hi2 = np.quantile(z2.numpy(), cfg.ipr, axis=0)
    np.testing.assert_allclose(hi2 - lo2, np.mean(hi - lo), rtol=1e-3)  # every expert at the layer's mean range
    np.testing.assert_allclose(np.median(z2.numpy(), axis=0), 0.0, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_returns_consistent_logits_weights_and_indices(family: str) -> None:
    model = tiny(family)
    b = find_moe_blocks(model)[0]
    aff = LayerAffine(0, scale=[1.0, 2.0, 0.5, 1.0, 1.0, 3.0, 1.0, 1.0],
                      shift=[0.0, 0.1, 0.0, -0.2, 0.0, 0.0, 0.3, 0.0])
    calib = RouterCalibration("expert", {0: aff})
    h = torch.randn(17, b.router.weight.shape[1])
    raw = b.router(h)[0]
    with install_romer(model, None, calib):
        z, w, idx = b.router(h)
    torch.testing.assert_close(z, raw * torch.tensor(aff.scale) + torch.tensor(aff.shift))
    w2, idx2 = route(z, b.top_k, b.norm_topk_prob)
    assert torch.equal(idx, idx2) and torch.equal(w, w2)
    assert RouterCalibration.from_dict(calib.to_dict()).layers[0] == aff


def test_padding_excluded_from_logits() -> None:
    model = tiny("olmoe")
    blocks = find_moe_blocks(model)
    x = torch.randint(0, 64, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with LogitRecorder(blocks) as rec, torch.no_grad():
        rec.set_mask(mask)
        model(input_ids=x, attention_mask=mask)
    assert rec.cat(0).shape[0] == 16
