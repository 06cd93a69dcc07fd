"""Placement of crossbar blocks on chip tiles, and the weight <-> block round trip of deployment."""

from __future__ import annotations

import numpy as np
import pytest

from hil.deploy import MatrixMap, blocks_of, rebuild_matrix
from hil.placement import BlockKey, plan_placement
from romer.mapping import MappingConfig, conductance_to_weight, weight_to_conductance


def _key(i: int) -> BlockKey:
    return BlockKey("t", i, 0, 0, 0)


def test_shelf_packing_has_no_overlaps_and_stays_inside_tiles() -> None:
    rng = np.random.default_rng(0)
    blocks = [(_key(i), int(rng.integers(8, 100)), int(rng.integers(8, 100))) for i in range(200)]
    plan = plan_placement(blocks, tiles=8, rows=128, cols=128)
    occupied = np.zeros((8, 128, 128), dtype=np.int32)
    for p in plan.placed:
        r = p.region
        assert 0 <= r.tile < 8 and r.row0 + r.nrows <= 128 and r.col0 + r.ncols <= 128
        occupied[r.tile, r.row0:r.row0 + r.nrows, r.col0:r.col0 + r.ncols] += 1
    assert occupied.max() == 1
    assert len(plan.placed) + len(plan.overflow) == 200
    assert plan.cells == int(occupied.sum())


def test_overflow_keeps_order_and_reports_what_did_not_fit() -> None:
    blocks = [(_key(i), 64, 64) for i in range(10)]
    plan = plan_placement(blocks, tiles=2, rows=128, cols=128)  # 4 blocks per tile
    assert [p.key.matrix for p in plan.placed] == list(range(8))
    assert [k.matrix for k in plan.overflow] == [8, 9]
    assert plan.tiles_used == 2


def test_block_larger_than_a_tile_is_an_error() -> None:
    with pytest.raises(ValueError, match="larger than a tile"):
        plan_placement([(_key(0), 300, 10)], tiles=1, rows=256, cols=256)


def test_blocks_round_trip_to_the_same_weights() -> None:
    w = np.random.default_rng(1).standard_normal((100, 300)).astype(np.float32)
    cond = weight_to_conductance(w, MappingConfig(tile=(64, 128)))
    mm = MatrixMap("w", 0, cond)
    blocks = dict(blocks_of(mm))
    assert len(blocks) == 2 * 2 * 3  # 2 row blocks x 3 column blocks x (W+, W-)
    for k, b in blocks.items():
        assert b.shape == (64, 128) and b.min() >= 0 and b.max() <= 25.0 + 1e-4, k
    back = rebuild_matrix(mm, blocks, drift_compensation=False)
    np.testing.assert_allclose(back, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(conductance_to_weight(cond), w, rtol=1e-5, atol=1e-6)


def test_drift_compensation_undoes_a_global_decay() -> None:
    w = np.random.default_rng(2).standard_normal((64, 64)).astype(np.float32)
    mm = MatrixMap("w", 0, weight_to_conductance(w, MappingConfig(tile=(64, 64))))
    decayed = {k: b * 0.8 for k, b in blocks_of(mm)}
    np.testing.assert_allclose(rebuild_matrix(mm, decayed, drift_compensation=True), w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rebuild_matrix(mm, decayed, drift_compensation=False), 0.8 * w, rtol=1e-4, atol=1e-5)
