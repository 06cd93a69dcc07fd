"""Chip profile: geometry, conductance range and the electrical limits programming must respect."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from hil.protocol import ProgramSettings, Region


class SafetyError(ValueError):
    """Programming settings outside the chip profile's limits; nothing was sent to the chip."""


@dataclass(frozen=True)
class ChipProfile:
    tiles: int = 4
    rows: int = 256
    cols: int = 256
    g_min: float = 0.0  # µS
    g_max: float = 25.0  # µS
    v_prog_max: float = 3.0  # V, absolute pulse amplitude limit
    i_prog_max: float = 300e-6  # A, compliance current limit
    width_min_ns: float = 10.0
    width_max_ns: float = 1000.0
    max_pulses: int = 100
    block_max_cells: int = 65536  # largest block one command may carry

    @property
    def cells(self) -> int:
        return self.tiles * self.rows * self.cols

    def check_settings(self, s: ProgramSettings) -> None:
        """Refuse unsafe or impossible programming conditions, naming the offending field."""
        problems = []
        if not 0 < s.v_min <= s.v_max:
            problems.append(f"pulse amplitudes v_min={s.v_min} V, v_max={s.v_max} V must satisfy 0 < v_min <= v_max")
        if s.v_max > self.v_prog_max:
            problems.append(f"v_max={s.v_max} V exceeds the profile limit {self.v_prog_max} V")
        if not 0 < s.i_compliance_a <= self.i_prog_max:
            problems.append(f"compliance current {s.i_compliance_a} A outside (0, {self.i_prog_max}] A")
        if not self.width_min_ns <= s.width_min_ns <= s.width_max_ns <= self.width_max_ns:
            problems.append(f"pulse widths [{s.width_min_ns}, {s.width_max_ns}] ns outside the profile's "
                            f"[{self.width_min_ns}, {self.width_max_ns}] ns")
        if not 1 <= s.max_pulses <= self.max_pulses:
            problems.append(f"max_pulses={s.max_pulses} outside [1, {self.max_pulses}]")
        if not 0 < s.tolerance_us < (self.g_max - self.g_min):
            problems.append(f"verify tolerance {s.tolerance_us} µS must be in (0, {self.g_max - self.g_min})")
        if problems:
            raise SafetyError("; ".join(problems))

    def check_region(self, r: Region) -> None:
        """A block operation's rectangle must lie inside one tile and within the block limit."""
        if not (0 <= r.tile < self.tiles and 0 <= r.row0 and 0 <= r.col0 and r.nrows > 0 and r.ncols > 0
                and r.row0 + r.nrows <= self.rows and r.col0 + r.ncols <= self.cols):
            raise ValueError(f"region tile={r.tile} rows {r.row0}..{r.row0 + r.nrows - 1} cols {r.col0}.."
                             f"{r.col0 + r.ncols - 1} is outside the array (outside the chip: {self.tiles} tiles "
                             f"of {self.rows}x{self.cols})")
        if r.size > self.block_max_cells:
            raise ValueError(f"region of {r.size} cells exceeds the chip's block limit of {self.block_max_cells}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
