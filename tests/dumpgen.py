"""Synthetic measurement dumps sampled exactly from a known NoiseModel (test and bench helper).

Follows `noise_fit.dump_schema`: targets spanning [g_min, g_max], stuck cells, per-cell nu
constant across reads, R independent reads at each time.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from noise_fit import dump_schema
from noise_fit.model import NoiseModel


def sample_reads(model: NoiseModel, n_cells: int, times: tuple[float, ...], repeats: int,
                 rng: np.random.Generator, dtype: type = np.float32) -> dict[str, np.ndarray]:
    """Targets, stuck codes and (T, R, N) reads drawn from `model`."""
    g_target = rng.uniform(model.g_min, model.g_max, n_cells).astype(dtype)
    stuck = model.stuck_codes((n_cells,), rng)
    g_prog = model.programmed(g_target, rng, stuck=stuck)
    nu = model.drift_exponents(g_prog, rng)
    nu[stuck != 0] = 0.0
    g = np.empty((len(times), repeats, n_cells), dtype=np.float32)
    for i, t in enumerate(times):
        for r in range(repeats):
            g[i, r] = model.at_time(g_prog, float(t), rng, nu=nu, stuck=stuck)
    return {"g_target": g_target, "stuck": stuck, "g": g, "nu": nu, "g_prog": g_prog}


def write_dump(path: str | Path, model: NoiseModel, n_cells: int = 20000,
               times: tuple[float, ...] = (1.0, 60.0, 3600.0, 86400.0), repeats: int = 3, seed: int = 0,
               device_flags: bool = False, tiles: int = 4) -> dict[str, np.ndarray]:
    """Write a complete dump per the schema; returns the sampled ground truth arrays."""
    rng = np.random.default_rng(seed)
    s = sample_reads(model, n_cells, times, repeats, rng)
    cols = 64
    idx = np.arange(n_cells)
    per_tile = -(-n_cells // tiles)
    data = {
        "cells/tile": (idx // per_tile).astype(np.int32),
        "cells/row": ((idx % per_tile) // cols).astype(np.int32),
        "cells/col": (idx % cols).astype(np.int32),
        "cells/g_target": s["g_target"].astype(np.float32),
        "cells/stuck": s["stuck"].astype(np.int8) if device_flags else np.full(n_cells, -1, np.int8),
        "program/pulses": np.ones(n_cells, np.int16),
        "program/verified": np.ones(n_cells, np.int8),
        "program/done": np.ones(1, np.int8),
        "reads/t": np.asarray(times, np.float64),
        "reads/g": s["g"],
        "reads/clock": np.zeros((len(times), repeats), np.float64),
        "reads/done": np.ones((len(times), repeats), np.int8),
    }
    with h5py.File(path, "w") as f:
        f.attrs["schema"] = dump_schema.SCHEMA
        f.attrs["schema_version"] = dump_schema.SCHEMA_VERSION
        f.attrs["software_version"] = "test"
        f.attrs["device_idn"] = f"SIM,dumpgen,{model.name},seed{seed}"
        f.attrs["geometry"] = json.dumps({"tiles": tiles, "cols": cols})
        f.attrs["settings"] = json.dumps({"g_max": model.g_max, "g_min": model.g_min})
        f.attrs["truth"] = model.to_json()
        f.attrs["created"] = "2026-01-01T00:00:00"
        f.attrs["complete"] = True
        for name, arr in data.items():
            ds = f.create_dataset(name, data=arr)
            ds.attrs["units"] = dump_schema.DATASETS[name][1]
    return s
