"""`hil measure`: characterise a chip and write a resumable HDF5 dump.

Programs a characterisation pattern (target levels spanning the range, placed at random over the
measured cells), reads it back with repeats at several times after programming on the device
clock, and writes everything to HDF5 as it goes. Each program block and each read pass is marked
done only after its data is flushed, so `--resume` continues exactly where a run stopped and an
interrupted run ends with the same dump as an uninterrupted one.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hil import protocol as P
from hil.connect import SimOptions, connect
from hil.driver import ChipDriver, tile_regions
from hil.profile import ChipProfile, SafetyError
from hil.runfiles import check_output, sim_state_path
from noise_fit import dump_schema as S

SOFTWARE_VERSION = "0.1.0"
REPEAT_SPACING_S = 1e-3  # device time between repeated read passes at one nominal time


class MeasureError(RuntimeError):
    """A measurement could not start or continue; the message says what and where."""


@dataclass(frozen=True)
class MeasureConfig:
    device: str = "sim"
    out: str = "dump.h5"
    tiles: tuple[int, ...] | None = None  # None: all tiles
    rows: int = 64  # measured rows per tile (from row 0)
    cols: int = 256  # measured columns per tile (from column 0)
    levels: int = 16  # distinct target levels spanning [g_min, g_max]
    times_s: tuple[float, ...] = (1.0, 60.0, 3600.0, 86400.0)
    repeats: int = 3
    seed: int = 0  # pattern seed (which level goes where)
    block_rows: int | None = None
    settings: P.ProgramSettings = field(default_factory=P.ProgramSettings)
    resume: bool = False
    overwrite: bool = False
    timeout_s: float = 5.0
    # simulated chip only
    sim_truth: str = "pcm-chip"
    sim_seed: int = 0
    sim_profile: ChipProfile = field(default_factory=ChipProfile)

    def settings_json(self) -> str:
        d = asdict(self)
        for k in ("out", "resume", "overwrite", "timeout_s", "device"):
            d.pop(k)
        if self.device != "sim":  # the simulated chip's own options mean nothing for other devices
            for k in ("sim_truth", "sim_seed", "sim_profile"):
                d.pop(k)
        return json.dumps(d, sort_keys=True)


@dataclass
class MeasureResult:
    out: str
    device_idn: str
    cells: int
    verified_fraction: float
    mean_pulses: float
    stuck_reported: int
    times_s: list[float]
    mean_g_by_time: list[float]
    read_noise_us: float
    retries: int
    resumed: bool
    passes_done: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pattern(cfg: MeasureConfig, profile: ChipProfile, n: int) -> np.ndarray:
    levels = np.linspace(profile.g_min, profile.g_max, cfg.levels, dtype=np.float32)
    rng = np.random.default_rng(cfg.seed)
    return levels[rng.permutation(np.arange(n) % cfg.levels)]


def open_device(cfg: MeasureConfig, state_path: Path | None = None):  # type: ignore[no-untyped-def]
    """A connected driver for ``cfg.device`` (see `hil.connect.connect`)."""
    return connect(cfg.device, cfg.timeout_s, SimOptions(cfg.sim_truth, cfg.sim_seed, cfg.sim_profile), state_path)


def _check_config(cfg: MeasureConfig, profile: ChipProfile) -> list[int]:
    tiles = list(range(profile.tiles)) if cfg.tiles is None else list(cfg.tiles)
    bad = [t for t in tiles if not 0 <= t < profile.tiles]
    if bad or not tiles:
        raise MeasureError(f"tiles {bad or tiles} not on the chip (it has tiles 0..{profile.tiles - 1})")
    if not 1 <= cfg.rows <= profile.rows or not 1 <= cfg.cols <= profile.cols:
        raise MeasureError(f"measured area {cfg.rows}x{cfg.cols} does not fit a tile of {profile.rows}x{profile.cols}")
    if cfg.levels < 2:
        raise MeasureError(f"levels must be >= 2, got {cfg.levels}")
    times = list(cfg.times_s)
    if cfg.repeats < 1 or not times or any(t < 0 for t in times) or times != sorted(times):
        raise MeasureError(f"read times must be non-negative and increasing and repeats >= 1, got "
                           f"times {list(cfg.times_s)} s, repeats {cfg.repeats}")
    try:
        profile.check_settings(cfg.settings)
    except SafetyError as e:
        raise MeasureError(f"programming settings refused before touching the chip: {e}") from None
    return tiles


def _create_dump(path: Path, cfg: MeasureConfig, idn: str, profile: ChipProfile, tiles: list[int],
                 regions: list[P.Region], truth_json: str | None) -> None:
    cells = [(r.tile, r.row0 + i, r.col0 + j) for r in regions for i in range(r.nrows) for j in range(r.ncols)]
    idx = np.asarray(cells, dtype=np.int32)
    n, T, R = len(cells), len(cfg.times_s), cfg.repeats
    tmp = path.with_name(path.name + ".partial")
    chunk = min(n, 1 << 16)
    with h5py.File(tmp, "w") as f:
        f.attrs.update({
            "schema": S.SCHEMA, "schema_version": S.SCHEMA_VERSION, "software_version": SOFTWARE_VERSION,
            "device_idn": idn, "device": cfg.device, "geometry": json.dumps(profile.to_dict()),
            "settings": cfg.settings_json(), "created": datetime.now(UTC).isoformat(),
            "run_id": uuid.uuid4().hex[:12], "complete": False,
        })
        if truth_json is not None:
            f.attrs["truth"] = truth_json

        def ds(name: str, data: Any = None, shape: Any = None, fill: Any = None, chunks: Any = True) -> None:
            dtype, units = S.DATASETS[name]
            d = f.create_dataset(name, data=data, shape=shape, dtype=dtype, chunks=chunks, fillvalue=fill,
                                 compression="gzip", compression_opts=1, shuffle=True)
            d.attrs["units"] = units

        ds("cells/tile", idx[:, 0], chunks=(chunk,))
        ds("cells/row", idx[:, 1], chunks=(chunk,))
        ds("cells/col", idx[:, 2], chunks=(chunk,))
        ds("cells/g_target", _pattern(cfg, profile, n), chunks=(chunk,))
        ds("cells/stuck", shape=(n,), fill=-1, chunks=(chunk,))
        ds("program/pulses", shape=(n,), fill=-1, chunks=(chunk,))
        ds("program/verified", shape=(n,), fill=-1, chunks=(chunk,))
        ds("program/done", shape=(len(regions),), fill=0, chunks=None)
        ds("reads/t", np.asarray(cfg.times_s, dtype=np.float64), chunks=None)
        ds("reads/g", shape=(T, R, n), fill=np.nan, chunks=(1, 1, chunk))
        ds("reads/clock", shape=(T, R), fill=np.nan, chunks=None)
        ds("reads/done", shape=(T, R), fill=0, chunks=None)
    tmp.replace(path)  # the dump appears only once its structure is complete


def _open_for_resume(path: Path, cfg: MeasureConfig, idn: str) -> h5py.File:
    try:
        f = h5py.File(path, "r+")
    except OSError as e:
        raise MeasureError(f"--resume: cannot open {path} as HDF5: {e}") from None
    if f.attrs.get("schema") != S.SCHEMA:
        f.close()
        raise MeasureError(f"--resume: {path} is not a romer-hil measurement dump")
    if f.attrs.get("settings") != cfg.settings_json():
        f.close()
        raise MeasureError(f"--resume: {path} was measured with different settings; resume with the same options")
    if f.attrs.get("device_idn") != idn:
        f.close()
        raise MeasureError(
            f"--resume: {path} was measured on {f.attrs.get('device_idn')!r}, connected device is {idn!r}")
    return f


ProgressFn = Callable[[str, int, int], None]


def run_measurement(cfg: MeasureConfig, progress: ProgressFn | None = None,
                    driver: ChipDriver | None = None) -> MeasureResult:
    """Measure a chip into ``cfg.out``. Pass ``driver`` to use an already connected chip."""
    out = Path(cfg.out)
    check_output(out, cfg.resume, cfg.overwrite, MeasureError)
    state_path = sim_state_path(out, cfg.device, cfg.resume)
    if driver is not None:
        return _measure(cfg, out, driver, progress)
    with open_device(cfg, state_path=state_path) as drv:
        return _measure(cfg, out, drv, progress)


def _measure(cfg: MeasureConfig, out: Path, drv: ChipDriver, progress: ProgressFn | None) -> MeasureResult:
    report = progress or (lambda stage, done, total: None)
    idn = drv.idn()
    profile = drv.profile()
    tiles = _check_config(cfg, profile)
    regions = list(tile_regions(profile, tiles, cfg.rows, cfg.cols, cfg.block_rows))
    drv.configure_programming(cfg.settings)  # validated locally first; nothing programmed yet
    if not cfg.resume:
        truth = drv.truth()
        _create_dump(out, cfg, idn, profile, tiles, regions, truth.to_json() if truth else None)
    f = _open_for_resume(out, cfg, idn)
    resumed = cfg.resume
    try:
        run_id = str(f.attrs["run_id"])
        g_target = f["cells/g_target"][:]
        offsets = np.cumsum([0] + [r.size for r in regions])
        done = f["program/done"]
        total = len(regions)
        for b, region in enumerate(regions):
            if not done[b]:
                sl = slice(offsets[b], offsets[b + 1])
                pulses, verified = drv.program_block(region, g_target[sl], txn=f"{run_id}-p{b}")
                f["program/pulses"][sl] = pulses
                f["program/verified"][sl] = verified
                f.flush()
                done[b] = 1
                f.flush()
            report("program", b + 1, total)
        if "t_program_end" not in f.attrs:
            f.attrs["t_program_end"] = drv.clock()
            f.flush()
        t_end = float(f.attrs["t_program_end"])
        stuck = np.concatenate([drv.stuck_block(r) for r in regions])
        f["cells/stuck"][:] = stuck
        f.flush()
        T, R = len(cfg.times_s), cfg.repeats
        rdone = f["reads/done"]
        passes = 0
        for k, t in enumerate(cfg.times_s):
            for rep in range(R):
                if not rdone[k, rep]:
                    t_abs = t_end + t + rep * REPEAT_SPACING_S
                    drv.wait_until(t_abs)
                    g = np.concatenate([drv.read_block(r) for r in regions])
                    f["reads/g"][k, rep, :] = g
                    f["reads/clock"][k, rep] = t_abs
                    f.flush()
                    rdone[k, rep] = 1
                    f.flush()
                passes += 1
                report("read", k * R + rep + 1, T * R)
        f.attrs["complete"] = True
        f.flush()
        return _summarise(f, cfg, idn, drv.retries, resumed)
    finally:
        f.close()


def _summarise(f: h5py.File, cfg: MeasureConfig, idn: str, retries: int, resumed: bool) -> MeasureResult:
    verified = f["program/verified"][:]
    pulses = f["program/pulses"][:]
    stuck = f["cells/stuck"][:]
    g = f["reads/g"]
    means, noise = [], []
    for k in range(g.shape[0]):
        gk = g[k]
        means.append(float(np.nanmean(gk)))
        if gk.shape[0] > 1:
            noise.append(float(np.nanmean(np.nanstd(gk, axis=0, ddof=1))))
    return MeasureResult(
        out=str(cfg.out), device_idn=idn, cells=int(verified.size),
        verified_fraction=float(np.mean(verified == 1)), mean_pulses=float(np.mean(pulses[pulses >= 0])),
        stuck_reported=int(np.sum(stuck > 0)), times_s=[float(t) for t in cfg.times_s],
        mean_g_by_time=means, read_noise_us=float(np.mean(noise)) if noise else float("nan"),
        retries=retries, resumed=resumed, passes_done=int(np.sum(f["reads/done"][:])),
    )
