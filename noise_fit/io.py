"""Reading and validating HDF5 measurement dumps (layout in `noise_fit.dump_schema`).

Every failure is a `DumpError` naming the file, the dataset and what was expected, so that
`hil fit` can print one clean line instead of a traceback from deep inside numpy or h5py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from noise_fit import dump_schema

REQUIRED = ("cells/g_target", "reads/t", "reads/g")
OPTIONAL = ("cells/tile", "cells/row", "cells/col", "cells/stuck")


class DumpError(ValueError):
    """A measurement dump cannot be fitted; the message names file, dataset and expectation."""


@dataclass
class Dump:
    """The arrays of one dump that fitting needs, validated (conductances in µS, times in s)."""

    path: str
    g_target: np.ndarray  # (N,) float64
    t: np.ndarray  # (T,) float64, strictly increasing, >= 0
    g: np.ndarray  # (T, R, N) float32, NaN = not measured, tiny negatives clipped to 0
    tile: np.ndarray  # (N,) int32
    row: np.ndarray  # (N,) int32
    col: np.ndarray  # (N,) int32
    stuck_flags: np.ndarray  # (N,) int8, -1 unknown
    attrs: dict[str, Any] = field(default_factory=dict)
    g_max: float = 0.0
    g_min: float = 0.0
    warnings: list[str] = field(default_factory=list)
    n_negative_clipped: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.g.shape  # type: ignore[return-value]


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _json_attr(attrs: dict[str, Any], key: str) -> dict[str, Any]:
    v = attrs.get(key)
    if isinstance(v, str):
        try:
            d = json.loads(v)
        except json.JSONDecodeError:
            return {}
        return d if isinstance(d, dict) else {}
    return v if isinstance(v, dict) else {}


def read_dump(path: str | Path, *, min_cells: int = 20, neg_tol: float = 0.01) -> Dump:
    """Open, validate and load a dump. `neg_tol`: reads down to -neg_tol*g_max are clipped to 0
    (instrument offset), anything more negative is an error."""
    import h5py

    p = Path(path)
    if not p.exists():
        raise DumpError(f"{p}: file does not exist")
    if not p.is_file():
        raise DumpError(f"{p}: is not a file")
    try:
        ok = h5py.is_hdf5(p)
    except OSError as e:
        raise DumpError(f"{p}: cannot be read ({e})") from None
    if not ok:
        raise DumpError(f"{p}: not an HDF5 file (expected a measurement dump written by `hil measure`)")
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise DumpError(f"{p}: cannot open as HDF5 ({e})") from None
    with f:
        attrs = {k: _attr(v) for k, v in f.attrs.items()}
        schema = attrs.get("schema")
        if schema is not None and schema != dump_schema.SCHEMA:
            raise DumpError(f"{p}: root attribute 'schema' is {schema!r}, expected {dump_schema.SCHEMA!r}")
        ver = attrs.get("schema_version")
        if ver is not None:
            try:
                ver_i = int(ver)
            except (TypeError, ValueError):
                raise DumpError(f"{p}: root attribute 'schema_version' {ver!r} is not an integer") from None
            if ver_i > dump_schema.SCHEMA_VERSION:
                raise DumpError(f"{p}: schema_version {ver_i} is newer than this software "
                                f"({dump_schema.SCHEMA_VERSION})")
        arrays: dict[str, np.ndarray] = {}
        for name in REQUIRED + OPTIONAL:
            if name not in f:
                if name in REQUIRED:
                    raise DumpError(f"{p}: dataset '/{name}' is missing (expected {dump_schema.DATASETS[name][0]}, "
                                    f"units {dump_schema.DATASETS[name][1]!r})")
                continue
            ds = f[name]
            if not isinstance(ds, h5py.Dataset):
                raise DumpError(f"{p}: '/{name}' is a group, expected a dataset")
            want_units = dump_schema.DATASETS[name][1]
            units = _attr(ds.attrs.get("units"))
            if units is None:
                raise DumpError(f"{p}: dataset '/{name}' has no 'units' attribute (expected {want_units!r})")
            if units != want_units:
                raise DumpError(f"{p}: dataset '/{name}' has units {units!r}, expected {want_units!r}")
            if ds.dtype.kind not in "fiu":
                raise DumpError(f"{p}: dataset '/{name}' has dtype {ds.dtype}, expected numeric "
                                f"({dump_schema.DATASETS[name][0]})")
            arrays[name] = ds[()]
    return _validate(p, arrays, attrs, min_cells=min_cells, neg_tol=neg_tol)


def _validate(p: Path, a: dict[str, np.ndarray], attrs: dict[str, Any], *, min_cells: int,
              neg_tol: float) -> Dump:
    warnings: list[str] = []
    g_target = np.asarray(a["cells/g_target"], dtype=np.float64)
    t = np.asarray(a["reads/t"], dtype=np.float64)
    g = np.asarray(a["reads/g"])
    if g_target.ndim != 1:
        raise DumpError(f"{p}: '/cells/g_target' has shape {g_target.shape}, expected (N,)")
    if t.ndim != 1:
        raise DumpError(f"{p}: '/reads/t' has shape {t.shape}, expected (T,)")
    n, n_t = g_target.shape[0], t.shape[0]
    if g.ndim != 3:
        raise DumpError(f"{p}: '/reads/g' has shape {g.shape}, expected (T, R, N) = ({n_t}, R, {n})")
    if g.shape[0] != n_t or g.shape[2] != n:
        raise DumpError(f"{p}: '/reads/g' has shape {g.shape}, expected (T, R, N) = ({n_t}, R, {n}) "
                        "from '/reads/t' and '/cells/g_target'")
    if n == 0 or n_t == 0 or g.shape[1] == 0:
        raise DumpError(f"{p}: empty dump ('/reads/g' has shape {g.shape}); nothing to fit")
    bad = ~np.isfinite(g_target)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DumpError(f"{p}: '/cells/g_target' has {int(bad.sum())} NaN/inf value(s) (first at cell {i}); "
                        "targets must be finite µS")
    if (g_target < 0).any():
        i = int(np.flatnonzero(g_target < 0)[0])
        raise DumpError(f"{p}: '/cells/g_target' has {int((g_target < 0).sum())} negative conductance(s) "
                        f"(first at cell {i}: {g_target[i]:g} µS); expected >= 0")
    if not np.isfinite(t).all() or (t < 0).any():
        raise DumpError(f"{p}: '/reads/t' must be finite times >= 0 s after programming, got {t.tolist()[:8]}")
    if n_t > 1 and not (np.diff(t) > 0).all():
        raise DumpError(f"{p}: '/reads/t' must be strictly increasing, got {t.tolist()[:8]}")
    g = g.astype(np.float32, copy=False)
    if np.isinf(g).any():
        raise DumpError(f"{p}: '/reads/g' has {int(np.isinf(g).sum())} infinite value(s); expected µS or NaN "
                        "(not measured)")
    finite = np.isfinite(g)
    if not finite.any():
        raise DumpError(f"{p}: empty dump: '/reads/g' holds no measured value (all NaN)")

    settings = _json_attr(attrs, "settings")
    truth = _json_attr(attrs, "truth")
    geometry = _json_attr(attrs, "geometry")
    g_max = None
    for src in (settings, geometry, truth):
        if isinstance(src.get("g_max"), int | float) and src["g_max"] > 0:
            g_max = float(src["g_max"])
            break
    if g_max is None:
        g_max = float(max(g_target.max(), np.nanmax(g)))
        if g_max <= 0:
            raise DumpError(f"{p}: all targets and reads are 0 µS; cannot infer the conductance range")
        warnings.append(f"no g_max in dump settings; using the largest target/read, {g_max:g} µS")
    g_min = float(settings.get("g_min", 0.0)) if isinstance(settings.get("g_min", 0.0), int | float) else 0.0
    g_min = min(max(g_min, 0.0), 0.99 * g_max)

    # `np.nanmin` on a partly-NaN array is safe: at least one finite value exists (checked above).
    gmin_read = float(np.nanmin(g))
    if gmin_read < -neg_tol * g_max:
        neg = int((g < -neg_tol * g_max).sum())
        raise DumpError(f"{p}: '/reads/g' has {neg} negative conductance(s) down to {gmin_read:g} µS; "
                        f"expected >= 0 (tolerance -{neg_tol * g_max:g} µS for instrument offset)")
    n_neg = 0
    if gmin_read < 0:
        neg_mask = g < 0
        n_neg = int(neg_mask.sum())
        g = g.copy()
        g[neg_mask] = 0.0
        warnings.append(f"{n_neg} slightly negative read(s) clipped to 0 µS")

    measured_cells = int(finite.any(axis=(0, 1)).sum())
    if measured_cells < min_cells:
        raise DumpError(f"{p}: too few cells: {measured_cells} cell(s) have a measured read, need >= {min_cells}")
    if attrs.get("complete") is False or attrs.get("complete") == 0:
        warnings.append("dump is marked incomplete (interrupted run); fitting what was measured")

    def idx(name: str) -> np.ndarray:
        if name not in a:
            warnings.append(f"dataset '/{name}' missing; using cell index")
            return np.arange(n, dtype=np.int32) if name == "cells/col" else np.zeros(n, dtype=np.int32)
        v = np.asarray(a[name])
        if v.shape != (n,):
            raise DumpError(f"{p}: '/{name}' has shape {v.shape}, expected ({n},)")
        return v.astype(np.int32, copy=False)

    tile, row, col = idx("cells/tile"), idx("cells/row"), idx("cells/col")
    if "cells/stuck" in a:
        flags = np.asarray(a["cells/stuck"])
        if flags.shape != (n,):
            raise DumpError(f"{p}: '/cells/stuck' has shape {flags.shape}, expected ({n},)")
        flags = flags.astype(np.int8, copy=False)
        if not np.isin(flags, (-1, 0, 1, 2)).all():
            raise DumpError(f"{p}: '/cells/stuck' must hold -1 (unknown), 0, 1 or 2")
    else:
        flags = np.full(n, -1, dtype=np.int8)
    return Dump(path=str(p), g_target=g_target, t=t, g=g, tile=tile, row=row, col=col, stuck_flags=flags,
                attrs=attrs, g_max=g_max, g_min=g_min, warnings=warnings, n_negative_clipped=n_neg)
