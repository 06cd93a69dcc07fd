"""Analog noise injection into a loaded MoE model, in place, seeded, with a bit-exact restore.

Why in place: a 7B-parameter model does not fit twice in 24 GB. Each selected weight tensor
is processed one matrix at a time (one expert's gate, up or down projection; one attention
projection; rows blocks when a single matrix is very large): torch -> numpy zero-copy (CPU
float32), weights -> conductances (`romer.mapping`) -> the noise model's own
``stuck_codes`` / ``programmed`` / ``at_time`` (the maths stays in `noise_fit`) -> weights,
written back into the parameter. Clean copies of the touched tensors are kept in their own
dtype (memory) or as raw bytes in temporary files, one per tensor (disk, for models that do not
fit twice), and restored bit-exactly.

Determinism: every matrix draws from its own generator seeded by (seed, crc32(parameter
name), matrix index[, row block]); the same seed gives identical noisy weights whatever else
is selected or how many worker threads run.

Global drift compensation (optional, default on): per matrix (per row block for very large
matrices) the read conductances are rescaled by mean|g_eff(t=0)| / mean|g_eff(t)|, where
g_eff = g+ - g- and t = 0 is the programmed state. This mirrors a chip that measures a
reference output right after programming and again at read time (aihwkit's global drift
compensation); it removes the common drift scale, not the programming noise.

Which parts live on the analog chip (``InjectConfig.parts``):
``experts`` (routed experts, default), ``shared`` (shared experts and Qwen's shared-expert
gate), ``router``, ``attention`` (all linear projections of attention), ``dense`` (dense MLP
layers), ``lm_head``; ``all`` selects all of them. Biases, norms and embeddings stay digital,
as does DeepSeek-V3's router bias (e_score_correction_bias).
"""

from __future__ import annotations

import os
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from noise_fit.model import NoiseModel
from romer.adapters import decoder_layers, find_moe_blocks
from romer.mapping import MappingConfig, conductance_to_weight, weight_to_conductance

_MARK = "_romer_noise_injected"
PARTS = ("experts", "shared", "router", "attention", "dense", "lm_head")


@dataclass(frozen=True)
class InjectConfig:
    """What goes on the chip and how it is read."""

    parts: tuple[str, ...] = ("experts",)
    t_read: float = 3600.0
    drift_compensation: bool = True
    per_row: bool = False
    tile: tuple[int, int] | None = None
    backup: str = "memory"  # "memory" (clones, model dtype) or "disk" (temporary raw files, one per tensor)
    workers: int = 1  # threads over matrices; numpy's RNG and ufuncs release the GIL
    block_elems: int = 1 << 22  # larger matrices go in row blocks of about this many weights (bounds memory)

    def __post_init__(self) -> None:
        parts = tuple(self.parts)
        if "all" in parts:
            parts = PARTS
        bad = [p for p in parts if p not in PARTS]
        if bad:
            raise ValueError(f"unknown analog part(s) {bad}; expected some of {PARTS} or 'all'")
        if not parts:
            raise ValueError("select at least one analog part")
        object.__setattr__(self, "parts", parts)
        if self.backup not in ("memory", "disk"):
            raise ValueError(f"backup must be 'memory' or 'disk', got {self.backup!r}")
        if self.t_read < 0:
            raise ValueError(f"t_read must be >= 0 s, got {self.t_read}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


@dataclass
class AnalogTensor:
    """One parameter stored on the chip, seen as a stack of matrices ``matrix_shape`` [..., R, C]."""

    name: str
    part: str
    param: torch.Tensor
    matrix_shape: tuple[int, ...]

    @property
    def n_matrices(self) -> int:
        return int(np.prod(self.matrix_shape[:-2], dtype=np.int64))


def analog_tensors(model: nn.Module, parts: tuple[str, ...] | list[str]) -> list[AnalogTensor]:
    """The parameters that the selected parts put on the chip, with their matrix views."""
    parts = InjectConfig(parts=tuple(parts)).parts
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    out: list[AnalogTensor] = []
    seen: set[int] = set()

    def add(p: torch.Tensor, part: str, shape: tuple[int, ...] | None = None) -> None:
        if id(p) in seen:
            return
        seen.add(id(p))
        out.append(AnalogTensor(names.get(id(p), f"<{part}>"), part, p, tuple(shape or p.shape)))

    def linears(m: nn.Module, part: str) -> None:
        for sub in m.modules():
            if isinstance(sub, nn.Linear):
                add(sub.weight, part)

    blocks = find_moe_blocks(model)
    moe_layers = {b.layer for b in blocks}
    for b in blocks:
        if "experts" in parts:
            gu, dn = b.experts.gate_up_proj, b.experts.down_proj
            e, two_i, h = gu.shape
            add(gu, "experts", (e, 2, two_i // 2, h))  # gate and up are separate crossbar matrices
            add(dn, "experts")
        if "router" in parts:
            add(b.router.weight, "router")
        if "shared" in parts:
            for m in b.shared or []:
                linears(m, "shared")
            if b.shared_gate is not None:
                linears(b.shared_gate, "shared")
    _, layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        if "attention" in parts:
            attn = getattr(layer, "self_attn", None)
            if attn is not None:
                linears(attn, "attention")
        if "dense" in parts and i not in moe_layers and getattr(layer, "mlp", None) is not None:
            linears(layer.mlp, "dense")
    if "lm_head" in parts:
        head = getattr(model, "lm_head", None)
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if head is not None and not (emb is not None and head.weight is emb.weight):
            add(head.weight, "lm_head")  # tied heads stay digital: noise would corrupt the embedding too
    return out


def _matrix_rng(seed: int, name: str, index: int, block: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode()), index, block])


def _read_devices(noise: NoiseModel, g: np.ndarray, t: float, rng: np.random.Generator,
                  want_prog: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Program target conductances and read them at time t (the steps of NoiseModel.sample)."""
    stuck = noise.stuck_codes(g.shape, rng)
    g_prog = noise.programmed(g, rng, stuck=stuck)
    g_t = noise.at_time(g_prog, t, rng, stuck=stuck)
    return g_t, (g_prog if want_prog else None)


def _noisy_block(w: np.ndarray, noise: NoiseModel, mapping: MappingConfig, t: float, rng: np.random.Generator,
                 want_sums: bool, scale: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Uncompensated read-back weights, and per-matrix sums mean|g_eff(0)|, mean|g_eff(t)| (x size)."""
    c = weight_to_conductance(w, mapping, scale)
    gp, gp0 = _read_devices(noise, c.g_pos, t, rng, want_sums)
    if c.g_neg is not None:
        gn, gn0 = _read_devices(noise, c.g_neg, t, rng, want_sums)
        c.g_pos, c.g_neg = gp, gn
        eff0 = None if gp0 is None else gp0 - gn0
    else:
        c.g_pos = gp
        eff0 = gp0
    num = den = np.zeros(0)
    if eff0 is not None:
        axes = tuple(range(eff0.ndim - 4, eff0.ndim))  # per matrix (tiled layout [..., nR, tr, nC, tc])
        num = np.abs(eff0).sum(axis=axes, dtype=np.float64)
        den = np.abs(c.effective).sum(axis=axes, dtype=np.float64)
    return conductance_to_weight(c).astype(w.dtype, copy=False), num, den


def _alpha(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


def noisy_matrix(w: np.ndarray, noise: NoiseModel, mapping: MappingConfig, t: float, rng: np.random.Generator,
                 drift_compensation: bool = True, scale: np.ndarray | None = None) -> np.ndarray:
    """Weights [..., R, C] as read back from the chip at time t (numpy in, numpy out, same dtype).

    With drift compensation each matrix is rescaled by mean|g_eff(0)| / mean|g_eff(t)|; the map
    back to weights is linear, so this equals rescaling its conductances.
    """
    out, num, den = _noisy_block(w, noise, mapping, t, rng, drift_compensation, scale)
    if drift_compensation:
        out *= _alpha(num, den).astype(out.dtype)[..., None, None]
    return out


@dataclass
class InjectHandle:
    """Undo record of one injection; `restore()` puts the clean weights back bit-exactly."""

    model: nn.Module
    tensors: list[AnalogTensor]
    seed: int
    config: InjectConfig
    seconds: float = 0.0
    n_weights: int = 0
    _backup: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _disk: Path | None = field(default=None, repr=False)
    restored: bool = False

    def restore(self) -> None:
        """Write the clean weights back (idempotent); removes the disk backup."""
        if self.restored:
            return
        self.model.__dict__.pop(_MARK, None)
        with torch.no_grad():
            if self._disk is not None:
                for i, at in enumerate(self.tensors):  # one tensor in memory at a time
                    raw = np.fromfile(self._disk / f"{i}.bin", dtype=np.uint8)
                    at.param.copy_(torch.from_numpy(raw).view(at.param.dtype).view(at.param.shape))
                for p in self._disk.iterdir():
                    p.unlink()
                self._disk.rmdir()
                self._disk = None
            else:
                for at in self.tensors:
                    at.param.copy_(self._backup[at.name])
                self._backup.clear()
        self.restored = True

    def __enter__(self) -> InjectHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def summary(self) -> dict[str, Any]:
        parts: dict[str, int] = {}
        for at in self.tensors:
            parts[at.part] = parts.get(at.part, 0) + at.param.numel()
        return {"seed": self.seed, "seconds": round(self.seconds, 4), "n_weights": self.n_weights,
                "weights_per_part": parts, "n_tensors": len(self.tensors)}


class NoiseInjector:
    """A noise model plus an InjectConfig, applied to models with `inject(model, seed)`."""

    def __init__(self, noise: NoiseModel, config: InjectConfig | None = None) -> None:
        self.noise = noise
        self.config = config or InjectConfig()
        self.mapping = MappingConfig(mapping=noise.mapping, g_max=noise.g_max,
                                     per_row=self.config.per_row, tile=self.config.tile)

    def _block_rows(self, r: int, c: int) -> int:
        """Rows per block: about `block_elems` weights (cache-sized), whole tiles when tiled."""
        rows = min(r, max(1, self.config.block_elems // c))
        if self.mapping.tile is not None and rows < r:
            tr = self.mapping.tile[0]
            rows = min(r, max(tr, rows // tr * tr))
        return rows

    def _process(self, at: AnalogTensor, seed: int, m: int) -> None:
        """One matrix, in row blocks; per-matrix scale and drift compensation across blocks."""
        r, c = at.matrix_shape[-2:]
        mat = at.param.detach().view(-1, r, c)[m]
        rows = self._block_rows(r, c)
        scale = None
        if rows < r and self.mapping.tile is None and not self.mapping.per_row:
            amax = float(mat.abs().max())  # one scale for the whole matrix across row blocks
            scale = np.full((1, 1, 1, 1), self.mapping.g_max / amax if amax > 0 else 1.0, dtype=np.float32)
        comp = self.config.drift_compensation
        num = den = 0.0
        for b, r0 in enumerate(range(0, r, rows)):
            dst = mat[r0:r0 + rows]
            src = dst.numpy() if dst.dtype == torch.float32 else dst.float().numpy()
            out, n_b, d_b = _noisy_block(src, self.noise, self.mapping, self.config.t_read,
                                         _matrix_rng(seed, at.name, m, b), comp, scale)
            if comp:
                num, den = num + float(n_b.sum()), den + float(d_b.sum())
            dst.copy_(torch.from_numpy(out))
        if comp:
            alpha = float(_alpha(np.float64(num), np.float64(den)))
            mat.mul_(alpha)

    def inject(self, model: nn.Module, seed: int) -> InjectHandle:
        """Replace the selected weights by noisy reads, in place; returns the restore handle."""
        t_start = time.perf_counter()
        if model.__dict__.get(_MARK):
            raise RuntimeError("model already holds injected noise; restore() the previous handle first")
        tensors = analog_tensors(model, self.config.parts)
        for at in tensors:
            if at.param.device.type != "cpu":
                raise ValueError(f"{at.name}: noise injection runs on CPU tensors, got {at.param.device}")
            if not at.param.is_contiguous():
                raise ValueError(f"{at.name}: parameter is not contiguous")
        handle = InjectHandle(model=model, tensors=tensors, seed=seed, config=self.config)
        if self.config.backup == "disk":
            # raw bytes, one file per tensor: never more than one tensor copied in memory at a time
            d = Path(tempfile.mkdtemp(prefix="romer-clean-"))
            handle._disk = d
            for i, at in enumerate(tensors):
                at.param.detach().reshape(-1).view(torch.uint8).numpy().tofile(d / f"{i}.bin")
        else:
            handle._backup = {at.name: at.param.detach().clone() for at in tensors}
        try:
            with torch.no_grad():
                jobs = [(at, m) for at in tensors for m in range(at.n_matrices)]
                if self.config.workers > 1:
                    with ThreadPoolExecutor(max_workers=self.config.workers) as pool:
                        list(pool.map(lambda j: self._process(j[0], seed, j[1]), jobs))
                else:
                    for at, m in jobs:
                        self._process(at, seed, m)
        except BaseException:
            handle.restore()
            raise
        model.__dict__[_MARK] = True  # guards against backing up noisy weights as "clean"
        handle.n_weights = sum(at.param.numel() for at in tensors)
        handle.seconds = time.perf_counter() - t_start
        return handle


def inject_noise(model: nn.Module, noise: NoiseModel, config: InjectConfig | None = None,
                 seed: int = 0) -> InjectHandle:
    """Put noisy weights into ``model`` in place; ``handle.restore()`` (or ``with``) undoes it."""
    return NoiseInjector(noise, config).inject(model, seed)


def default_workers() -> int:
    """Worker threads for injection: the CPUs this process may use, at most 4."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    return max(1, min(4, n))
