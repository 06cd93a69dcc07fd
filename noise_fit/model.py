"""The device noise model: the contract between measurement, fitting and ROMER.

A `NoiseModel` is a frozen, JSON-serialisable description of one analog memory device
technology. It follows the three-stage structure of IBM aihwkit's PCM model (programming
noise, drift, drift-time read noise) with every dependence on conductance written as a small
`Curve`, so that a published preset and a model fitted from a dump are the same object.

Conventions (see ../DESIGN.md): conductance in µS, time in seconds. ``t`` is the time since
the end of programming; drift is ``g(t) = g_prog * ((t + t0) / t0) ** -nu`` so that ``t = 0``
is the programmed state (aihwkit's convention).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from noise_fit import _sampling

SCHEMA = "romer-hil/noise-model"
SCHEMA_VERSION = 1

CURVE_KINDS = ("const", "poly", "loglin", "power", "split")
MAPPINGS = ("differential", "direct")
READ_TIME_LAWS = ("none", "log1f")
_X_FLOOR = 1e-6  # lower bound on g/g_max inside log and negative powers (g = 0 is legal)


class NoiseModelError(ValueError):
    """A noise model (or its JSON file) is malformed; the message names the field."""


@dataclass(frozen=True)
class Curve:
    """A function of normalised conductance x = g / g_max, clipped to [lo, hi].

    kinds: ``const`` c0; ``poly`` sum_i c_i x^i; ``loglin`` c0 + c1 ln x; ``power`` c0 x^c1;
    ``split`` (published piecewise fits, e.g. IBM HERMES): for x < c0, clip(c1 + c2 ln x, c3, c4),
    else the polynomial sum_i c_{5+i} x^i.
    ``ln`` and negative powers use max(x, 1e-6), so g = 0 is always defined.
    """

    kind: str
    coeffs: tuple[float, ...]
    lo: float | None = None
    hi: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in CURVE_KINDS:
            raise NoiseModelError(f"curve kind {self.kind!r} unknown; expected one of {CURVE_KINDS}")
        need = {"const": 1, "loglin": 2, "power": 2}.get(self.kind)
        if need is not None and len(self.coeffs) != need:
            raise NoiseModelError(f"curve kind {self.kind!r} needs {need} coefficients, got {len(self.coeffs)}")
        if self.kind == "split" and len(self.coeffs) < 6:
            raise NoiseModelError(f"curve kind 'split' needs >= 6 coefficients, got {len(self.coeffs)}")
        if self.kind == "poly" and len(self.coeffs) == 0:
            raise NoiseModelError("curve kind 'poly' needs at least one coefficient")
        if not all(np.isfinite(self.coeffs)):
            raise NoiseModelError(f"curve coefficients must be finite, got {self.coeffs}")
        object.__setattr__(self, "coeffs", tuple(float(c) for c in self.coeffs))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
        c = self.coeffs
        if self.kind == "const":
            y = np.full(x.shape, c[0], dtype=dtype)
        elif self.kind == "poly":
            y = np.full(x.shape, c[-1], dtype=dtype)
            for ci in reversed(c[:-1]):  # Horner
                y = y * x + ci
        elif self.kind == "loglin":
            y = c[0] + c[1] * np.log(np.maximum(x, _X_FLOOR))
        elif self.kind == "split":
            low = np.clip(c[1] + c[2] * np.log(np.maximum(x, _X_FLOOR)), c[3], c[4])
            high = np.full(x.shape, c[-1], dtype=dtype)
            for ci in reversed(c[5:-1]):
                high = high * x + ci
            y = np.where(x < c[0], low, high)
        else:
            y = c[0] * np.power(np.maximum(x, _X_FLOOR), c[1])
        y = np.asarray(y, dtype=dtype)
        if self.lo is not None or self.hi is not None:
            y = np.clip(y, self.lo, self.hi)
        return y

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "coeffs": list(self.coeffs), "lo": self.lo, "hi": self.hi}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "curve") -> Curve:
        try:
            return cls(kind=d["kind"], coeffs=tuple(d["coeffs"]), lo=d.get("lo"), hi=d.get("hi"))
        except KeyError as e:
            raise NoiseModelError(f"{where}: missing field {e.args[0]!r}") from None
        except NoiseModelError as e:
            raise NoiseModelError(f"{where}: {e}") from None


@dataclass(frozen=True)
class NoiseModel:
    """Statistical model of one device technology (all conductances in µS).

    - programming: g_prog = g_target + prog_scale * sigma_prog(x) * N(0,1), clipped to >= 0
    - drift: nu = |nu_mean(x) + nu_std(x) * N(0,1)| * drift_scale, g(t) = g_prog ((t+t0)/t0)^-nu
    - read noise (each read independent): sigma = read_scale * read_sigma(x) * law(t), relative
      to g when ``read_relative`` else absolute in µS; law ``log1f`` is
      sqrt(ln((t + t0 + t_read) / (2 t_read))) (accumulated 1/f noise), ``none`` is 1.
    - stuck cells: with probability p_stuck_low a cell holds g_stuck_low, with p_stuck_high
      g_stuck_high, whatever the target; stuck cells do not drift.
    """

    name: str
    g_min: float
    g_max: float
    prog_sigma: Curve
    nu_mean: Curve = field(default_factory=lambda: Curve("const", (0.0,)))
    nu_std: Curve = field(default_factory=lambda: Curve("const", (0.0,)))
    t0: float = 20.0
    read_sigma: Curve = field(default_factory=lambda: Curve("const", (0.0,)))
    read_relative: bool = True
    read_time_law: str = "none"
    t_read: float = 250e-9
    p_stuck_low: float = 0.0
    p_stuck_high: float = 0.0
    g_stuck_low: float = 0.0
    g_stuck_high: float | None = None  # None: g_max
    mapping: str = "differential"
    prog_scale: float = 1.0
    read_scale: float = 1.0
    drift_scale: float = 1.0
    provenance: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (np.isfinite(self.g_min) and np.isfinite(self.g_max)) or not 0 <= self.g_min < self.g_max:
            raise NoiseModelError(f"need 0 <= g_min < g_max (µS), got g_min={self.g_min}, g_max={self.g_max}")
        if self.t0 <= 0 or self.t_read <= 0:
            raise NoiseModelError(f"t0 and t_read must be > 0 s, got t0={self.t0}, t_read={self.t_read}")
        for name in ("p_stuck_low", "p_stuck_high"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise NoiseModelError(f"{name} must be a probability in [0, 1], got {p}")
        if self.p_stuck_low + self.p_stuck_high > 1.0:
            raise NoiseModelError("p_stuck_low + p_stuck_high must not exceed 1")
        for name in ("prog_scale", "read_scale", "drift_scale"):
            if getattr(self, name) < 0:
                raise NoiseModelError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.mapping not in MAPPINGS:
            raise NoiseModelError(f"mapping {self.mapping!r} unknown; expected one of {MAPPINGS}")
        if self.read_time_law not in READ_TIME_LAWS:
            raise NoiseModelError(f"read_time_law {self.read_time_law!r} unknown; expected {READ_TIME_LAWS}")

    # ---- derived quantities -------------------------------------------------------------
    @property
    def stuck_high_value(self) -> float:
        return self.g_max if self.g_stuck_high is None else self.g_stuck_high

    def x(self, g: np.ndarray) -> np.ndarray:
        return np.asarray(g) / self.g_max

    def sigma_prog(self, g_target: np.ndarray) -> np.ndarray:
        """Programming-noise standard deviation (µS) at the target conductance."""
        return self.prog_scale * np.maximum(self.prog_sigma(self.x(g_target)), 0.0)

    def read_time_factor(self, t: float | np.ndarray) -> float | np.ndarray:
        """Scalar for a scalar t; per element for an array of times (cells programmed at different times)."""
        if self.read_time_law == "none":
            return 1.0
        f = np.sqrt(np.log((np.asarray(t) + self.t0 + self.t_read) / (2.0 * self.t_read)))
        return float(f) if f.ndim == 0 else f

    def sigma_read(self, g: np.ndarray, t: float | np.ndarray) -> np.ndarray:
        """Read-noise standard deviation (µS) of one read at conductance g, time t."""
        s = self.read_scale * np.maximum(self.read_sigma(self.x(np.abs(g))), 0.0) * self.read_time_factor(t)
        return s * np.abs(g) if self.read_relative else s * np.ones_like(np.asarray(g))

    def drift_factor(self, nu: np.ndarray, t: float | np.ndarray) -> np.ndarray:
        return np.power((t + self.t0) / self.t0, -nu)

    # ---- sampling (vectorised, seeded) ----------------------------------------------------
    # `programmed`, `at_time` and `sample` run the chunked, multithreaded kernels of
    # noise_fit/_sampling.py: the same distributions as written in the class docstring, in the
    # input's float dtype. Each call draws 128 bits from ``rng`` and gives chunk i (of ``chunk``
    # elements) its own child generator, so the result is a deterministic function of the
    # generator state and ``chunk``, independent of ``workers`` (threads; default min(4, CPUs)).
    def stuck_codes(self, shape: int | tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        """0 = healthy, 1 = stuck low, 2 = stuck high (int8); each cell independently."""
        codes = np.zeros(shape, dtype=np.int8)
        lo, hi = _sampling.stuck_positions(codes.size, rng, self.p_stuck_low, self.p_stuck_high)
        flat = codes.reshape(-1)
        flat[lo] = 1
        flat[hi] = 2
        return codes

    def drift_exponents(self, g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        g = np.asarray(g)
        dtype = g.dtype if np.issubdtype(g.dtype, np.floating) else np.float64
        x = self.x(np.abs(g))
        z = rng.standard_normal(g.shape, dtype=dtype) if dtype in (np.float32, np.float64) else \
            rng.standard_normal(g.shape)
        return (np.abs(self.nu_mean(x) + self.nu_std(x) * z) * self.drift_scale).astype(dtype, copy=False)

    def programmed(self, g_target: np.ndarray, rng: np.random.Generator, stuck: np.ndarray | None = None,
                   *, workers: int | None = None, chunk: int = _sampling.DEFAULT_CHUNK) -> np.ndarray:
        """Conductances right after programming (t = 0). `stuck` codes are drawn if not given."""
        src, out, flat = _prepare(g_target)
        if stuck is None:
            stuck = self.stuck_codes(out.shape, rng)
        codes = _flat_like(stuck, out.shape, "stuck")
        has_stuck = bool(codes.any())
        plan = _sampling.Plan.make(self, 0.0)
        empty = np.empty(0, np.intp)

        def chunk_fn(a: int, b: int, gen: np.random.Generator, buf: _sampling._Buffers) -> None:
            lo = hi = empty
            if has_stuck:
                lo, hi = np.flatnonzero(codes[a:b] == 1), np.flatnonzero(codes[a:b] == 2)
            _sampling.prog_stage(plan, src[a:b], flat[a:b], gen, buf, lo, hi)

        _sampling.run_chunks(flat.size, rng, flat.dtype, chunk_fn, workers, chunk)
        return out

    def at_time(self, g_prog: np.ndarray, t: float, rng: np.random.Generator, nu: np.ndarray | None = None,
                stuck: np.ndarray | None = None, *, workers: int | None = None,
                chunk: int = _sampling.DEFAULT_CHUNK) -> np.ndarray:
        """One read of programmed conductances at time t: drift, then read noise.

        ``nu`` (per-cell drift exponents) is drawn from nu(g_prog) when not given; pass the
        same ``nu`` for repeated reads of the same cells. Cells flagged in ``stuck`` do not drift.
        """
        if t < 0:
            raise ValueError(f"read time t must be >= 0 s, got {t}")
        src, out, flat = _prepare(g_prog)
        nu_flat = None if nu is None else _flat_like(nu, out.shape, "nu")
        codes = None if stuck is None else _flat_like(stuck, out.shape, "stuck")
        has_stuck = codes is not None and bool(codes.any())
        plan = _sampling.Plan.make(self, float(t))
        empty = np.empty(0, np.intp)

        def chunk_fn(a: int, b: int, gen: np.random.Generator, buf: _sampling._Buffers) -> None:
            g = flat[a:b]
            np.copyto(g, src[a:b])
            held = np.flatnonzero(codes[a:b]) if has_stuck else empty
            _sampling.drift_stage(plan, g, gen, buf, None if nu_flat is None else nu_flat[a:b], held)
            _sampling.read_stage(plan, g, gen, buf)

        _sampling.run_chunks(flat.size, rng, flat.dtype, chunk_fn, workers, chunk)
        return out

    def sample_into(self, g_target: np.ndarray, t: float, rng: np.random.Generator, out: np.ndarray | None = None,
                    *, workers: int | None = None, chunk: int = _sampling.DEFAULT_CHUNK) -> np.ndarray:
        """Target -> programmed (stuck cells included) -> one read at time t, fused per chunk.

        Same law as ``at_time(programmed(g, rng, stuck), t, rng, stuck=stuck)``. ``out`` (optional)
        must be C-contiguous, of g_target's shape and of its float dtype (float32 or float64;
        other inputs compute in float64); it may be ``g_target`` itself (in place).
        """
        if t < 0:
            raise ValueError(f"read time t must be >= 0 s, got {t}")
        src, out, flat = _prepare(g_target, out)
        plan = _sampling.Plan.make(self, float(t))
        p_low, p_high = self.p_stuck_low, self.p_stuck_high

        def chunk_fn(a: int, b: int, gen: np.random.Generator, buf: _sampling._Buffers) -> None:
            lo, hi = _sampling.stuck_positions(b - a, gen, p_low, p_high, buf.f64)
            g = flat[a:b]
            _sampling.prog_stage(plan, src[a:b], g, gen, buf, lo, hi)
            _sampling.drift_stage(plan, g, gen, buf, None, np.concatenate([lo, hi]) if lo.size + hi.size else lo)
            _sampling.read_stage(plan, g, gen, buf)

        _sampling.run_chunks(flat.size, rng, flat.dtype, chunk_fn, workers, chunk)
        return out

    def _floor(self, g: np.ndarray) -> None:
        """Physical conductances are never negative; the ``direct`` mapping stores signed values."""
        if self.mapping != "direct":
            np.maximum(g, 0.0, out=g)

    def sample(self, g_target: np.ndarray, t: float, rng: np.random.Generator,
               *, workers: int | None = None, chunk: int = _sampling.DEFAULT_CHUNK) -> np.ndarray:
        """Target -> programmed -> read at time t, in one call (a new array; see `sample_into`)."""
        return self.sample_into(g_target, t, rng, workers=workers, chunk=chunk)

    def scaled(self, prog: float | None = None, read: float | None = None,
               drift: float | None = None) -> NoiseModel:
        """A copy with noise scale factors replaced (for noise-level sweeps)."""
        kw: dict[str, float] = {}
        if prog is not None:
            kw["prog_scale"] = prog
        if read is not None:
            kw["read_scale"] = read
        if drift is not None:
            kw["drift_scale"] = drift
        return replace(self, **kw)

    # ---- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("prog_sigma", "nu_mean", "nu_std", "read_sigma"):
            d[k] = getattr(self, k).to_dict()
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "noise model") -> NoiseModel:
        if not isinstance(d, dict):
            raise NoiseModelError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if d.get("schema", SCHEMA) != SCHEMA:
            raise NoiseModelError(f"{where}: schema {d.get('schema')!r} is not {SCHEMA!r}")
        if int(d.get("schema_version", SCHEMA_VERSION)) > SCHEMA_VERSION:
            raise NoiseModelError(
                f"{where}: schema_version {d['schema_version']} is newer than this software ({SCHEMA_VERSION})")
        d = {k: v for k, v in d.items() if k not in ("schema", "schema_version")}
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise NoiseModelError(f"{where}: unknown field(s) {sorted(unknown)}")
        for req in ("name", "g_min", "g_max", "prog_sigma"):
            if req not in d:
                raise NoiseModelError(f"{where}: missing required field {req!r}")
        for k in ("prog_sigma", "nu_mean", "nu_std", "read_sigma"):
            if k in d:
                if not isinstance(d[k], dict):
                    raise NoiseModelError(f"{where}: field {k!r} must be an object")
                d[k] = Curve.from_dict(d[k], where=f"{where}: field {k!r}")
        try:
            return cls(**d)
        except (TypeError, NoiseModelError) as e:
            raise NoiseModelError(f"{where}: {e}") from None

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, default=_json_default)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> NoiseModel:
        p = Path(path)
        if not p.is_file():
            raise NoiseModelError(f"noise model file {str(p)!r} does not exist")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise NoiseModelError(f"{p}: not valid JSON ({e})") from None
        return cls.from_dict(d, where=str(p))


def _prepare(a: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat contiguous source in the work dtype, result array, flat view of the result)."""
    a = np.asarray(a)
    dt = _sampling.work_dtype(a)
    src = np.ascontiguousarray(a, dtype=dt).reshape(-1)
    if out is None:
        out = np.empty(a.shape, dt)
    elif out.shape != a.shape or out.dtype != dt or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writeable C-contiguous {dt} array of shape {a.shape}, "
                         f"got {out.dtype} {out.shape}")
    return src, out, out.reshape(-1)


def _flat_like(a: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """``a`` broadcast to ``shape``, flat and contiguous (a view when it already is)."""
    try:
        b = np.broadcast_to(np.asarray(a), shape)
    except ValueError:
        raise ValueError(f"{name} of shape {np.shape(a)} does not match the array shape {shape}") from None
    return np.ascontiguousarray(b).reshape(-1)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")
