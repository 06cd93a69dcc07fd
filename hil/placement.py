"""Where each weight block sits on the chip: model matrices -> crossbar blocks -> chip tiles.

Each analog weight matrix is cut into crossbar-sized blocks (the chip's tile size), each with its
own scale to g_max (romer.mapping's tiled layout), and each block needs two arrays (W+ and W-,
differential pair). Blocks are packed onto tiles with first-fit shelf packing; what does not fit
is reported, so the caller can keep it digital or emulate it with the noise model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from hil.protocol import Region


@dataclass(frozen=True)
class BlockKey:
    """One crossbar array of the model: tensor, matrix in its stack, tile-block (bi, bj), sign."""

    tensor: str
    matrix: int
    bi: int
    bj: int
    sign: int  # 0: W+ device, 1: W- device


@dataclass(frozen=True)
class Placed:
    key: BlockKey
    region: Region

    def to_row(self) -> dict[str, int | str]:
        return {**asdict(self.key), **asdict(self.region)}


@dataclass
class PlacementPlan:
    placed: list[Placed]
    overflow: list[BlockKey]
    tiles_used: int

    @property
    def cells(self) -> int:
        return sum(p.region.size for p in self.placed)


def plan_placement(blocks: list[tuple[BlockKey, int, int]], tiles: int, rows: int, cols: int,
                   first_tile: int = 0) -> PlacementPlan:
    """Shelf-pack (key, nrows, ncols) blocks in the given order onto tiles first_tile.. of rows x cols.

    Order is kept (no sorting), so that whole tensors land together and a prefix of the model
    (e.g. its first layers) is what fits when the chip is too small.
    """
    placed: list[Placed] = []
    overflow: list[BlockKey] = []
    tile, shelf_y, shelf_h, x = first_tile, 0, 0, 0
    last = first_tile + tiles
    for key, nr, nc in blocks:
        if nr > rows or nc > cols:
            raise ValueError(f"block {key} of {nr}x{nc} is larger than a tile ({rows}x{cols})")
        if tile >= last:
            overflow.append(key)
            continue
        if x + nc > cols:  # next shelf
            shelf_y, x, shelf_h = shelf_y + shelf_h, 0, 0
        if shelf_y + nr > rows:  # next tile
            tile, shelf_y, shelf_h, x = tile + 1, 0, 0, 0
            if tile >= last:
                overflow.append(key)
                continue
        placed.append(Placed(key, Region(tile, shelf_y, x, nr, nc)))
        x += nc
        shelf_h = max(shelf_h, nr)
    used = (max(p.region.tile for p in placed) - first_tile + 1) if placed else 0
    return PlacementPlan(placed=placed, overflow=overflow, tiles_used=used)
