"""Weight <-> conductance mapping, as a noise model's ``mapping`` says (numpy, float32-friendly).

A weight matrix W [rows = outputs, cols = inputs] is scaled so that its largest magnitude in
each scale group becomes ``g_max`` (µS):

- ``differential``: each weight on a pair of devices, W+ = max(sW, 0) on one and
  W- = max(-sW, 0) on the other; the weight is read back as (g+ - g-) / s.
- ``direct``: one signed "device" g = sW (used by the Gaussian baseline).

Scale groups: the whole matrix (``per_row=False``) or each output row (``per_row=True``),
optionally inside tiles of the chip's array size (e.g. 256x256: each tile has its own scale,
as each tile is its own crossbar with its own periphery gain). Leading dimensions (e.g. the
expert axis of a fused [E, out, in] tensor) are independent matrices.

The round trip without noise is exact up to float rounding (one multiply and one divide).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAPPINGS = ("differential", "direct")


@dataclass(frozen=True)
class MappingConfig:
    """How weights become conductances; ``tile`` is (rows, cols) of one crossbar, or None."""

    mapping: str = "differential"
    g_max: float = 25.0
    per_row: bool = False
    tile: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.mapping not in MAPPINGS:
            raise ValueError(f"mapping {self.mapping!r} unknown; expected one of {MAPPINGS}")
        if not self.g_max > 0:
            raise ValueError(f"g_max must be > 0 µS, got {self.g_max}")
        if self.tile is not None and (len(self.tile) != 2 or min(self.tile) < 1):
            raise ValueError(f"tile must be (rows, cols) >= 1, got {self.tile}")


@dataclass
class Conductances:
    """Mapped matrices: ``g_pos`` (and ``g_neg`` for differential) in µS, plus what undoes the map.

    Arrays are in the tiled layout [..., nR, tr, nC, tc]; ``scale`` broadcasts against them.
    """

    g_pos: np.ndarray
    g_neg: np.ndarray | None
    scale: np.ndarray
    shape: tuple[int, ...]  # original weight shape

    @property
    def effective(self) -> np.ndarray:
        """Signed conductance g+ - g- (or g for direct), tiled layout."""
        return self.g_pos if self.g_neg is None else self.g_pos - self.g_neg


def _tiled(w: np.ndarray, tile: tuple[int, int] | None) -> np.ndarray:
    """View/pad [..., R, C] into [..., nR, tr, nC, tc] (zero padding only when tiles do not divide)."""
    *lead, r, c = w.shape
    tr, tc = (r, c) if tile is None else (min(tile[0], r), min(tile[1], c))
    nr, nc = -(-r // tr), -(-c // tc)
    if nr * tr != r or nc * tc != c:
        pad = [(0, 0)] * len(lead) + [(0, nr * tr - r), (0, nc * tc - c)]
        w = np.pad(w, pad)
    return w.reshape(*lead, nr, tr, nc, tc)


def _untiled(t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    *lead, nr, tr, nc, tc = t.shape
    full = t.reshape(*lead, nr * tr, nc * tc)
    r, c = shape[-2], shape[-1]
    return full if (nr * tr, nc * tc) == (r, c) else full[..., :r, :c]


def weight_scale(w: np.ndarray, cfg: MappingConfig) -> np.ndarray:
    """Per-group scale s (µS per weight unit) in the tiled layout, so that max|sW| = g_max."""
    t = _tiled(np.asarray(w), cfg.tile)
    axes = (-1,) if cfg.per_row else (-3, -1)
    amax = np.max(np.abs(t), axis=axes, keepdims=True)
    amax = np.where(amax > 0, amax, 1.0).astype(t.dtype, copy=False)  # all-zero group: any scale works
    return (np.asarray(cfg.g_max, dtype=t.dtype) / amax).astype(t.dtype, copy=False)


def weight_to_conductance(w: np.ndarray, cfg: MappingConfig, scale: np.ndarray | None = None) -> Conductances:
    """Map weights [..., R, C] to target conductances; ``scale`` reuses a known scale."""
    w = np.asarray(w)
    if w.ndim < 2:
        raise ValueError(f"need a matrix [..., rows, cols], got shape {w.shape}")
    s = weight_scale(w, cfg) if scale is None else scale
    g = _tiled(w, cfg.tile) * s
    if cfg.mapping == "direct":
        return Conductances(g_pos=g, g_neg=None, scale=s, shape=w.shape)
    g_neg = np.maximum(-g, 0.0)
    np.maximum(g, 0.0, out=g)
    return Conductances(g_pos=g, g_neg=g_neg, scale=s, shape=w.shape)


def conductance_to_weight(c: Conductances) -> np.ndarray:
    """Inverse map: (g+ - g-) / s, back in the original [..., R, C] layout."""
    return _untiled(c.effective / c.scale, c.shape)
