"""`hil deploy`: put a model's analog parts on the chip, judge it by what the chip holds, recalibrate.

Round 0 maps the chosen weights (routed experts by default) to differential conductance pairs,
places the crossbar blocks on the chip's tiles, programs them through the driver (write-verify),
waits ``t_read`` on the device clock, reads every block back and rebuilds the weights from the
measured conductances; the model is then evaluated as deployed. Each further round runs ROMER on
the as-deployed model (activation frequencies and router percentiles measured with the weights the
chip actually holds), reprograms only the blocks whose contents change (replaced experts), reads
everything back and evaluates again.

Everything goes to an HDF5 run file (placement plan, targets and measured conductances per round,
metrics), written as it goes: a lost connection or a killed process is resumed with ``resume=True``
without reprogramming blocks already verified.
"""

from __future__ import annotations

import json
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from hil import protocol as P
from hil.connect import SimOptions, connect
from hil.driver import ChipDriver
from hil.placement import BlockKey, PlacementPlan, plan_placement
from hil.profile import ChipProfile
from hil.runfiles import check_output, sim_state_path
from noise_fit.model import NoiseModel
from noise_fit.presets import resolve
from romer.adapters import find_moe_blocks, load_model, load_tokenizer, model_family
from romer.calibrate import calib_nll, clean_logit_quantiles, fit_router_calibration, measure_load, token_batches
from romer.calibrated import RomerHooks, install_romer
from romer.inject import AnalogTensor, analog_tensors, noisy_matrix
from romer.mapping import Conductances, MappingConfig, _tiled, conductance_to_weight, weight_to_conductance
from romer.perplexity import WindowConfig, perplexity, tokenize_file
from romer.replace import ReplaceConfig, ReplacementPlan, apply_replacement, plan_replacement, shared_slices
from romer.router_calib import RouterCalibConfig
from romer.stats import RoutingRecorder, overlap

RUN_SCHEMA = "romer-hil/deploy"
RUN_SCHEMA_VERSION = 1
DEFAULT_CALIB = "data/text/calib.txt"
DEFAULT_EVAL = "data/text/eval.txt"


class DeployError(RuntimeError):
    """Deployment could not start or continue; the message says what and where."""


@dataclass(frozen=True)
class DeployConfig:
    model: str
    device: str = "sim"
    out: str = "deploy.h5"
    noise: str | None = None  # noise model for emulated (overflow) parts; default: the chip's truth or "pcm"
    parts: tuple[str, ...] = ("experts",)
    layers: tuple[int, ...] | None = None  # MoE layers to put on the chip; None: all (as many as fit)
    overflow: str = "emulate"  # what does not fit: "emulate" with the noise model, or keep "digital"
    t_read: float = 3600.0  # device time between programming and read-back, s
    rounds: int = 1  # ROMER recalibration rounds after the first deployment
    romer: bool = True
    replace: ReplaceConfig = field(default_factory=ReplaceConfig)
    router: RouterCalibConfig = field(default_factory=RouterCalibConfig)
    calib_text: str = DEFAULT_CALIB
    eval_text: str = DEFAULT_EVAL
    calib_tokens: int = 16384
    eval_tokens: int = 16384
    max_length: int = 256
    stride: int = 256
    batch_size: int = 8
    drift_compensation: bool = True
    settings: P.ProgramSettings = field(default_factory=P.ProgramSettings)
    seed: int = 0  # emulation noise seed
    resume: bool = False
    overwrite: bool = False
    timeout_s: float = 10.0
    sim_truth: str = "pcm-chip"
    sim_seed: int = 0
    sim_tiles: int | None = None  # None: as many tiles as the model's analog parts need
    sim_rows: int = 256
    sim_cols: int = 256

    def key_json(self) -> str:
        """The settings a resumed run must share with the original."""
        d = asdict(self)
        for k in ("out", "resume", "overwrite", "timeout_s", "device"):
            d.pop(k)
        return json.dumps(d, sort_keys=True, default=str)


@dataclass
class RoundMetrics:
    round: int
    ppl: float
    load_cv: float
    load_max_mean: float
    overlap: float
    blocks_programmed: int
    cells_programmed: int
    verified_fraction: float
    mean_pulses: float
    weight_rel_error: float  # ||W_deployed - W_target|| / ||W_target|| over the chip-held weights
    replaced: int = 0
    seconds: float = 0.0


@dataclass
class DeployResult:
    out: str
    model: str
    family: str
    device_idn: str
    clean_ppl: float
    clean_load_cv: float
    clean_load_max_mean: float
    emulated_ppl: float | None  # the same parts perturbed with the noise model instead of the chip
    rounds: list[RoundMetrics]
    placement: dict[str, Any]
    noise_model: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- weights <-> crossbar blocks -----------------------------------------------------------------
@dataclass
class MatrixMap:
    """One weight matrix's mapping: its tiled conductances and scale."""

    tensor: str
    matrix: int
    cond: Conductances


def _select_tensors(model: torch.nn.Module, cfg: DeployConfig) -> list[AnalogTensor]:
    tensors = analog_tensors(model, cfg.parts)
    if cfg.layers is None:
        return tensors
    keep = [t for t in tensors if any(f".layers.{i}." in t.name for i in cfg.layers)]
    if not keep:
        raise DeployError(f"layers {list(cfg.layers)} hold none of the parts {list(cfg.parts)}")
    return keep


def _matrices(at: AnalogTensor) -> torch.Tensor:
    r, c = at.matrix_shape[-2:]
    return at.param.detach().reshape(-1, r, c)


def map_weights(tensors: list[AnalogTensor], mcfg: MappingConfig) -> list[MatrixMap]:
    out = []
    for at in tensors:
        mats = _matrices(at)
        for m in range(mats.shape[0]):
            cond = weight_to_conductance(mats[m].float().numpy().copy(), mcfg)
            np.minimum(cond.g_pos, np.float32(mcfg.g_max), out=cond.g_pos)  # float rounding can overshoot g_max
            np.minimum(cond.g_neg, np.float32(mcfg.g_max), out=cond.g_neg)
            out.append(MatrixMap(at.name, m, cond))
    return out


def blocks_of(mm: MatrixMap) -> list[tuple[BlockKey, np.ndarray]]:
    """Crossbar blocks (W+ and W- arrays of each tile-block) of one mapped matrix."""
    nR, _, nC, _ = mm.cond.g_pos.shape
    out = []
    for bi in range(nR):
        for bj in range(nC):
            for sign, g in ((0, mm.cond.g_pos), (1, mm.cond.g_neg)):
                blk = g[bi, :, bj, :]
                out.append((BlockKey(mm.tensor, mm.matrix, bi, bj, sign), np.ascontiguousarray(blk)))
    return out


def rebuild_matrix(mm: MatrixMap, measured: dict[BlockKey, np.ndarray], drift_compensation: bool) -> np.ndarray:
    """Weights from measured conductances; optional per-matrix compensation against the known targets
    (hardware does the same with reference columns programmed to known values)."""
    gp = np.empty_like(mm.cond.g_pos)
    gn = np.empty_like(mm.cond.g_neg)
    nR, _, nC, _ = gp.shape
    for bi in range(nR):
        for bj in range(nC):
            gp[bi, :, bj, :] = measured[BlockKey(mm.tensor, mm.matrix, bi, bj, 0)]
            gn[bi, :, bj, :] = measured[BlockKey(mm.tensor, mm.matrix, bi, bj, 1)]
    if drift_compensation:
        eff_t = np.abs(mm.cond.g_pos - mm.cond.g_neg).sum(dtype=np.float64)
        eff_m = np.abs(gp - gn).sum(dtype=np.float64)
        if eff_m > 0:
            alpha = np.float32(eff_t / eff_m)
            gp *= alpha
            gn *= alpha
    return conductance_to_weight(Conductances(gp, gn, mm.cond.scale, mm.cond.shape))


# ---- the run file ------------------------------------------------------------------------------
def _create_run(path: Path, cfg: DeployConfig, idn: str, profile: ChipProfile, plan: PlacementPlan,
                overflow_tensors: list[str]) -> None:
    tmp = path.with_name(path.name + ".partial")
    with h5py.File(tmp, "w") as f:
        f.attrs.update({"schema": RUN_SCHEMA, "schema_version": RUN_SCHEMA_VERSION, "device_idn": idn,
                        "device": cfg.device, "model": cfg.model, "config": cfg.key_json(),
                        "geometry": json.dumps(profile.to_dict()), "run_id": uuid.uuid4().hex[:12],
                        "created": datetime.now(UTC).isoformat(), "complete": False,
                        "overflow_tensors": json.dumps(overflow_tensors)})
        g = f.create_group("placement")
        rows = [p.to_row() for p in plan.placed]
        g.create_dataset("tensor", data=np.array([r["tensor"] for r in rows], dtype=h5py.string_dtype()))
        for k in ("matrix", "bi", "bj", "sign", "tile", "row0", "col0", "nrows", "ncols"):
            d = g.create_dataset(k, data=np.array([r[k] for r in rows], dtype=np.int32))
            d.attrs["units"] = "index" if k != "sign" else "flag"
        g.attrs["tiles_used"] = plan.tiles_used
        g.attrs["cells"] = plan.cells
    tmp.replace(path)


def _round_group(f: h5py.File, k: int, n_blocks: int, n_cells: int) -> h5py.Group:
    name = f"rounds/{k}"
    if name in f:
        return f[name]
    g = f.create_group(name)
    chunk = max(1, min(n_cells, 1 << 18))
    for dname, dtype, units, shape, fill in (
        ("targets", "float32", "uS", (n_cells,), np.nan),
        ("measured", "float32", "uS", (n_cells,), np.nan),
        ("pulses", "int16", "count", (n_cells,), -1),
        ("verified", "int8", "flag", (n_cells,), -1),
    ):
        d = g.create_dataset(dname, shape=shape, dtype=dtype, fillvalue=fill, chunks=(chunk,),
                             compression="gzip", compression_opts=1, shuffle=True)
        d.attrs["units"] = units
    for dname in ("program_done", "reprogram", "read_done"):
        d = g.create_dataset(dname, shape=(n_blocks,), dtype="int8", fillvalue=0)
        d.attrs["units"] = "flag"
    return g


ProgressFn = Callable[[str, int, int], None]


class Deployment:
    """State of one deployment: the model, its clean weights, the mapping, the chip placement."""

    def __init__(self, cfg: DeployConfig, drv: ChipDriver, model: torch.nn.Module, tokenizer: Any,
                 progress: ProgressFn | None = None) -> None:
        self.cfg = cfg
        self.drv = drv
        self.model = model
        self.tokenizer = tokenizer
        self.report = progress or (lambda stage, done, total: None)
        self.profile = drv.profile()
        self.mcfg = MappingConfig("differential", g_max=self.profile.g_max,
                                  tile=(self.profile.rows, self.profile.cols))
        self.tensors = _select_tensors(model, cfg)
        self.clean = {at.name: at.param.detach().clone() for at in analog_tensors(model, cfg.parts)}
        self.maps = map_weights(self.tensors, self.mcfg)
        blocks = [b for mm in self.maps for b in blocks_of(mm)]
        self.targets = dict(blocks)
        self.plan = plan_placement([(k, t.shape[0], t.shape[1]) for k, t in blocks], self.profile.tiles,
                                   self.profile.rows, self.profile.cols)
        placed_tensors = {p.key.tensor for p in self.plan.placed}
        overflow_keys = {(k.tensor, k.matrix) for k in self.plan.overflow}
        # a matrix is on the chip only if all its blocks are: partially placed matrices are emulated whole
        self.on_chip = [mm for mm in self.maps if (mm.tensor, mm.matrix) not in overflow_keys]
        self.off_chip = [mm for mm in self.maps if (mm.tensor, mm.matrix) in overflow_keys]
        self.overflow_tensors = sorted({mm.tensor for mm in self.off_chip})
        self.placed_tensors = sorted(placed_tensors)
        self.offsets = np.cumsum([0] + [p.region.size for p in self.plan.placed])

    # -- chip I/O ------------------------------------------------------------------------------
    def program_and_read(self, f: h5py.File, k: int, changed: set[tuple[str, int]] | None) -> RoundMetrics:
        """Program the blocks of round k (all if ``changed`` is None), read all back, rebuild weights."""
        t_start = time.perf_counter()
        run_id = str(f.attrs["run_id"])
        placed = self.plan.placed
        g = _round_group(f, k, len(placed), int(self.offsets[-1]))
        if not g.attrs.get("planned", False):
            reprog = np.array([changed is None or (p.key.tensor, p.key.matrix) in changed for p in placed], np.int8)
            g["reprogram"][:] = reprog
            g["targets"][:] = np.concatenate([self.targets[p.key].reshape(-1) for p in placed]) if placed else []
            g.attrs["planned"] = True
            f.flush()
        reprog = g["reprogram"][:].astype(bool)
        done = g["program_done"]
        by_tile = self._blocks_by_tile()
        todo_tiles = [t for t, bs in by_tile.items() if any(reprog[b] and not done[b] for b in bs)]
        for n, tile in enumerate(todo_tiles):
            bs = [b for b in by_tile[tile] if reprog[b]]
            image = np.full((self.profile.rows, self.profile.cols), np.nan, np.float32)
            for b in bs:
                r = placed[b].region
                image[r.row0:r.row0 + r.nrows, r.col0:r.col0 + r.ncols] = self.targets[placed[b].key]
            pulses, verified = self._program_tile(tile, image, bs, f"{run_id}-r{k}-t{tile}")
            lo, hi = self.offsets[by_tile[tile][0]], self.offsets[by_tile[tile][-1] + 1]
            g["pulses"][lo:hi] = self._gather(by_tile[tile], pulses, g["pulses"][lo:hi], bs)
            g["verified"][lo:hi] = self._gather(by_tile[tile], verified, g["verified"][lo:hi], bs)
            done[bs] = 1  # after the data: a block is marked done only once its results are on disk
            f.flush()
            self.report(f"program r{k}", n + 1, len(todo_tiles))
        if "t_program_end" not in g.attrs:
            g.attrs["t_program_end"] = self.drv.clock()
            f.flush()
        t_read = float(g.attrs["t_program_end"]) + self.cfg.t_read
        rdone = g["read_done"]
        measured: dict[BlockKey, np.ndarray] = {}
        if not rdone[:].all():
            self.drv.wait_until(t_read)
            for n, (tile, bs) in enumerate(by_tile.items()):
                if rdone[bs].all():
                    continue
                image = self._read_tile(tile, bs)
                lo, hi = self.offsets[bs[0]], self.offsets[bs[-1] + 1]
                g["measured"][lo:hi] = np.concatenate([
                    image[placed[b].region.row0:placed[b].region.row0 + placed[b].region.nrows,
                          placed[b].region.col0:placed[b].region.col0 + placed[b].region.ncols].reshape(-1)
                    for b in bs])
                rdone[bs] = 1
                f.flush()
                self.report(f"read r{k}", n + 1, len(by_tile))
        allm = g["measured"][:]
        for b, p in enumerate(placed):
            measured[p.key] = allm[self.offsets[b]:self.offsets[b + 1]].reshape(p.region.nrows, p.region.ncols)
        err_num = err_den = 0.0
        with torch.no_grad():
            for mm in self.on_chip:
                w = rebuild_matrix(mm, measured, self.cfg.drift_compensation)
                w_t = conductance_to_weight(mm.cond)
                err_num += float(np.sum((w - w_t) ** 2))
                err_den += float(np.sum(w_t ** 2))
                self._param_matrix(mm.tensor, mm.matrix).copy_(torch.from_numpy(w))
        pulses_all = g["pulses"][:]
        ver_all = g["verified"][:]
        prog_mask = np.repeat(reprog, np.diff(self.offsets)) if placed else np.zeros(0, bool)
        return RoundMetrics(
            round=k, ppl=float("nan"), load_cv=float("nan"), load_max_mean=float("nan"), overlap=float("nan"),
            blocks_programmed=int(reprog.sum()), cells_programmed=int(prog_mask.sum()),
            verified_fraction=float(np.mean(ver_all[prog_mask] == 1)) if prog_mask.any() else 1.0,
            mean_pulses=float(np.mean(pulses_all[prog_mask])) if prog_mask.any() else 0.0,
            weight_rel_error=float(np.sqrt(err_num / err_den)) if err_den else 0.0,
            seconds=time.perf_counter() - t_start)

    def _blocks_by_tile(self) -> dict[int, list[int]]:
        """Placed block indices per tile; placement fills tiles in order, so each list is contiguous."""
        out: dict[int, list[int]] = {}
        for b, p in enumerate(self.plan.placed):
            out.setdefault(p.region.tile, []).append(b)
        return out

    def _gather(self, tile_blocks: list[int], image: np.ndarray, current: np.ndarray, chosen: list[int]) -> np.ndarray:
        """Per-block values (in placed order) of a tile image; blocks not chosen keep ``current``."""
        out = current.copy()
        chosen_set = set(chosen)
        base = self.offsets[tile_blocks[0]]
        for b in tile_blocks:
            if b in chosen_set:
                r = self.plan.placed[b].region
                out[self.offsets[b] - base:self.offsets[b + 1] - base] = \
                    image[r.row0:r.row0 + r.nrows, r.col0:r.col0 + r.ncols].reshape(-1)
        return out

    def _row_chunks(self, bs: list[int]) -> list[tuple[int, int]]:
        """(first row, rows) of the block-sized commands covering the rows of placed blocks ``bs``."""
        lo = min(self.plan.placed[b].region.row0 for b in bs)
        hi = max(self.plan.placed[b].region.row0 + self.plan.placed[b].region.nrows for b in bs)
        step = max(1, self.profile.block_max_cells // self.profile.cols)
        return [(r0, min(step, hi - r0)) for r0 in range(lo, hi, step)]

    def _program_tile(self, tile: int, image: np.ndarray, bs: list[int], txn: str) -> tuple[np.ndarray, np.ndarray]:
        """One write-verify command per row chunk holding blocks ``bs``; NaN cells are left untouched."""
        pulses = np.zeros(image.shape, np.int16)
        verified = np.full(image.shape, -1, np.int8)
        for r0, n in self._row_chunks(bs):
            chunk = image[r0:r0 + n]
            if np.isnan(chunk).all():
                continue
            p, v = self.drv.program_block(P.Region(tile, r0, 0, n, self.profile.cols), chunk, txn=f"{txn}-{r0}")
            pulses[r0:r0 + n] = p.reshape(n, -1)
            verified[r0:r0 + n] = v.reshape(n, -1)
        return pulses, verified

    def _read_tile(self, tile: int, bs: list[int]) -> np.ndarray:
        image = np.full((self.profile.rows, self.profile.cols), np.nan, np.float32)
        for r0, n in self._row_chunks(bs):
            image[r0:r0 + n] = self.drv.read_block(P.Region(tile, r0, 0, n, self.profile.cols)).reshape(n, -1)
        return image

    def _param_matrix(self, tensor: str, m: int) -> torch.Tensor:
        at = next(t for t in self.tensors if t.name == tensor)
        r, c = at.matrix_shape[-2:]
        return at.param.detach().view(-1, r, c)[m]

    # -- the parts that do not fit -------------------------------------------------------------------
    def emulate(self, dst: torch.Tensor, src: torch.Tensor, noise: NoiseModel, key: list[int]) -> None:
        """dst <- src as the noise model says the chip would hold it (same tiling and read time as the chip)."""
        mapping = MappingConfig(noise.mapping, g_max=noise.g_max, tile=self.mcfg.tile)
        rng = np.random.default_rng(key)
        dst.copy_(torch.from_numpy(noisy_matrix(src.float().numpy().copy(), noise, mapping, self.cfg.t_read, rng,
                                                self.cfg.drift_compensation)))

    def emulate_matrices(self, maps: list[MatrixMap], noise: NoiseModel, seed: int) -> None:
        """Perturb the given matrices, as they are in the model now, with the noise model."""
        with torch.no_grad():
            for mm in maps:
                dst = self._param_matrix(mm.tensor, mm.matrix)
                self.emulate(dst, dst, noise, [seed, mm.matrix, zlib.crc32(mm.tensor.encode())])

    def emulate_overflow(self, noise: NoiseModel, seed: int) -> None:
        """Perturb matrices that did not fit on the chip with the noise model (or leave them digital)."""
        if self.cfg.overflow == "emulate":
            self.emulate_matrices(self.off_chip, noise, seed)

    def restore_clean(self) -> None:
        with torch.no_grad():
            for at in analog_tensors(self.model, self.cfg.parts):
                at.param.copy_(self.clean[at.name])

    def set_targets_from_model(self) -> set[tuple[str, int]]:
        """Re-map the (clean, possibly ROMER-edited) weights now in the model; return changed matrices."""
        changed: set[tuple[str, int]] = set()
        new_maps = map_weights(self.tensors, self.mcfg)
        by_key = {(mm.tensor, mm.matrix): mm for mm in new_maps}
        for i, mm in enumerate(self.maps):
            new = by_key[(mm.tensor, mm.matrix)]
            if not (np.array_equal(new.cond.g_pos, mm.cond.g_pos) and np.array_equal(new.cond.g_neg, mm.cond.g_neg)):
                changed.add((mm.tensor, mm.matrix))
                self.maps[i] = new
        chip_keys = {(x.tensor, x.matrix) for x in self.on_chip}
        self.on_chip = [m for m in self.maps if (m.tensor, m.matrix) in chip_keys]
        self.off_chip = [m for m in self.maps if (m.tensor, m.matrix) not in chip_keys]
        self.targets = dict(b for mm in self.maps for b in blocks_of(mm))
        return changed


def _evaluate(model: torch.nn.Module, ids: torch.Tensor, wcfg: WindowConfig,
              clean_rec: RoutingRecorder | None) -> tuple[float, Any, float, RoutingRecorder]:
    with RoutingRecorder(model) as rec:
        res = perplexity(model, ids, wcfg, rec.set_mask)
    ov = overlap(clean_rec, rec).mean if clean_rec is not None else 1.0
    return res.ppl, rec.stats(), ov, rec


def _check_paths(cfg: DeployConfig) -> Path:
    out = Path(cfg.out)
    check_output(out, cfg.resume, cfg.overwrite, DeployError)
    for what, p in (("--calib-text", cfg.calib_text), ("--eval-text", cfg.eval_text)):
        if not Path(p).is_file():
            raise DeployError(f"{what} {p}: file does not exist")
    if Path(cfg.calib_text).resolve() == Path(cfg.eval_text).resolve():
        raise DeployError("--calib-text and --eval-text are the same file: calibration must never see evaluation text")
    if cfg.overflow not in ("emulate", "digital"):
        raise DeployError(f"--overflow must be 'emulate' or 'digital', got {cfg.overflow!r}")
    if cfg.rounds < 0:
        raise DeployError(f"--rounds must be >= 0, got {cfg.rounds}")
    return out


def _sim_tiles_needed(model: torch.nn.Module, cfg: DeployConfig, rows: int, cols: int) -> int:
    mcfg = MappingConfig("differential", g_max=25.0, tile=(rows, cols))
    blocks = []
    for at in _select_tensors(model, cfg):
        r, c = at.matrix_shape[-2:]
        t = _tiled(np.zeros((r, c), np.float32), mcfg.tile)
        nR, tr, nC, tc = t.shape
        blocks += [(BlockKey(at.name, m, i, j, s), tr, tc)
                   for m in range(at.n_matrices) for i in range(nR) for j in range(nC) for s in (0, 1)]
    return max(1, plan_placement(blocks, 1 << 20, rows, cols).tiles_used)


class RomerLoop:
    """ROMER on the as-deployed model. Before programming a round: measure expert frequencies with the
    weights the chip holds, plan the replacement and write it into the clean weights (so only the
    replaced experts' blocks change), record the clean router-logit quantiles. After read-back: fit
    the router calibration on the measured weights and install it."""

    def __init__(self, dep: Deployment, calib_ids: torch.Tensor, noise: NoiseModel) -> None:
        self.dep = dep
        self.noise = noise
        self.blocks = find_moe_blocks(dep.model)
        self.batches = token_batches(calib_ids, dep.cfg.max_length, dep.cfg.batch_size)
        # a calibrated checkpoint arrives with its replacement in the weights and its hooks installed
        loaded: RomerHooks | None = getattr(dep.model, "romer_hooks", None)
        self.plan: ReplacementPlan | None = loaded.plan if loaded is not None else None
        self.preplanned = self.plan is not None
        self.hooks: RomerHooks | None = loaded
        self.clean_q: dict[int, np.ndarray] | None = None

    def _remove_hooks(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None
            if getattr(self.dep.model, "romer_hooks", None) is not None:
                self.dep.model.romer_hooks = None

    def before_programming(self, k: int) -> dict[str, Any]:
        dep = self.dep
        self._remove_hooks()
        info: dict[str, Any] = {"round": k}
        if self.plan is None:
            counts, tokens = measure_load(dep.model, self.blocks, self.batches)  # as deployed
            top_k = {b.layer: b.top_k for b in self.blocks}
            n_slices = {b.layer: shared_slices(b) for b in self.blocks}
            self.plan = plan_replacement(counts, tokens, top_k, dep.cfg.replace, n_slices=n_slices)
            if dep.cfg.replace.gate and self.plan.n_replaced:
                self.plan = self._gate(self.plan)
                info["gate_calib_nll"] = self.plan.config.get("gate_calib_nll")
            dep.restore_clean()
            apply_replacement(dep.model, self.plan, self.blocks)
            # the replaced clean weights are the new reference for every later round
            dep.clean = {at.name: at.param.detach().clone() for at in analog_tensors(dep.model, dep.cfg.parts)}
            info["planned_on"] = "as-deployed weights"
        else:
            dep.restore_clean()
            info["planned_on"] = "checkpoint" if self.preplanned else "round 1"
        if self.clean_q is None:
            self.clean_q = clean_logit_quantiles(dep.model, self.blocks, self.batches, dep.cfg.router, self.plan)
        info["replaced"] = self.plan.n_replaced
        info["strategy"] = self.plan.strategy
        return info

    def _slot_matrices(self, layer: int, slot: int) -> list[tuple[AnalogTensor, int]]:
        """(tensor, matrix index) of one expert slot's crossbar matrices in a layer."""
        out = []
        for at in self.dep.tensors:
            if f".layers.{layer}." in at.name and at.part == "experts":
                per_expert = at.n_matrices // at.matrix_shape[0]
                out += [(at, slot * per_expert + j) for j in range(per_expert)]
        return out

    def _gate(self, plan: ReplacementPlan) -> ReplacementPlan:
        """Keep the plan only if it lowers the calibration-text loss, predicted before touching the chip:
        the chip's current weights everywhere, the new replica slots emulated with the noise model
        (clean replica weights, routed-expert copies or shared-expert slices, plus a noise draw)."""
        dep = self.dep
        base = calib_nll(dep.model, self.batches)
        deployed = {at.name: at.param.detach().clone() for at in dep.tensors}
        dep.restore_clean()
        handle = apply_replacement(dep.model, plan, self.blocks)  # clean replicas in the cold slots
        try:
            with torch.no_grad():
                replicas = [(at, m, at.param.detach().view(-1, *at.matrix_shape[-2:])[m].clone())
                            for lp in plan.layers for cold in lp.cold
                            for at, m in self._slot_matrices(lp.layer, cold)]
                for at in dep.tensors:
                    at.param.copy_(deployed[at.name])
                for n, (at, m, clean_rep) in enumerate(replicas):
                    dep.emulate(at.param.detach().view(-1, *at.matrix_shape[-2:])[m], clean_rep, self.noise,
                                [dep.cfg.seed, n, m, 0x6A7E])
            with install_romer(dep.model, plan, None, self.blocks):
                with_plan = calib_nll(dep.model, self.batches)
        finally:
            handle.restore()
            with torch.no_grad():
                for at in dep.tensors:
                    at.param.copy_(deployed[at.name])
        config = {**plan.config, "gate_calib_nll": {"without": base, "with": with_plan}}
        if with_plan >= base:
            return ReplacementPlan(strategy=plan.strategy, layers=[], config={**config, "gated_off": True})
        plan.config = config
        return plan

    def after_read_back(self) -> dict[str, Any]:
        calib = fit_router_calibration(self.dep.model, self.blocks, self.batches, self.clean_q, self.dep.cfg.router,
                                       self.plan)
        self.hooks = install_romer(self.dep.model, self.plan, calib, self.blocks)
        return {"router_mode": calib.mode, "plan": self.plan.to_dict() if self.plan else None}


def run_deploy(cfg: DeployConfig, progress: ProgressFn | None = None) -> DeployResult:
    """Deploy, evaluate, recalibrate with ROMER on the as-deployed weights, redeploy; see module doc."""
    t_all = time.perf_counter()
    out = _check_paths(cfg)
    model = load_model(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    family = model_family(model)
    wcfg = WindowConfig(cfg.max_length, cfg.stride, cfg.batch_size)
    eval_ids = tokenize_file(cfg.eval_text, tokenizer, cfg.eval_tokens)
    calib_ids = tokenize_file(cfg.calib_text, tokenizer, cfg.calib_tokens)
    tiles = cfg.sim_tiles or _sim_tiles_needed(model, cfg, cfg.sim_rows, cfg.sim_cols)
    sim = SimOptions(cfg.sim_truth, cfg.sim_seed, ChipProfile(tiles=tiles, rows=cfg.sim_rows, cols=cfg.sim_cols))
    state = sim_state_path(out, cfg.device, cfg.resume)
    with connect(cfg.device, cfg.timeout_s, sim, state) as drv:
        idn = drv.idn()
        drv.configure_programming(cfg.settings)
        truth = drv.truth()
        noise = resolve(cfg.noise) if cfg.noise else (truth or resolve("pcm"))
        dep = Deployment(cfg, drv, model, tokenizer, progress)
        if not cfg.resume:
            _create_run(out, cfg, idn, dep.profile, dep.plan, dep.overflow_tensors)
        f = h5py.File(out, "r+")
        try:
            if f.attrs.get("schema") != RUN_SCHEMA or f.attrs.get("config") != cfg.key_json():
                raise DeployError(f"--resume: {out} is not a run of this deployment (different model or settings)")
            if f.attrs.get("device_idn") != idn:
                raise DeployError(f"--resume: {out} was deployed on {f.attrs.get('device_idn')!r}, not {idn!r}")
            clean_ppl, clean_load, _, clean_rec = _evaluate(model, eval_ids, wcfg, None)
            loop = RomerLoop(dep, calib_ids, noise) if cfg.romer and cfg.rounds > 0 else None
            emulated = None
            rounds: list[RoundMetrics] = []
            for k in range(cfg.rounds + 1):
                changed = None
                info: dict[str, Any] = {}
                if k > 0 and loop is not None:
                    info = loop.before_programming(k)
                    changed = dep.set_targets_from_model()  # later rounds: only a re-read, t_read later
                m = dep.program_and_read(f, k, changed)
                dep.emulate_overflow(noise, cfg.seed + k)
                if k > 0 and loop is not None:
                    info.update(loop.after_read_back())
                ppl, load, ov, _ = _evaluate(model, eval_ids, wcfg, clean_rec)
                m.ppl, m.load_cv, m.load_max_mean, m.overlap = ppl, load.cv, load.max_mean, ov
                m.replaced = int(info.get("replaced", 0))
                f[f"rounds/{k}"].attrs["metrics"] = json.dumps({**asdict(m), "romer": info}, default=str)
                f.flush()
                rounds.append(m)
                if k == 0 and cfg.noise is not None:
                    emulated = _emulated_ppl(dep, noise, eval_ids, wcfg)
            f.attrs["complete"] = True
        finally:
            f.close()
    placement = {"tiles": dep.profile.tiles, "tiles_used": dep.plan.tiles_used, "cells": dep.plan.cells,
                 "blocks": len(dep.plan.placed), "tensors_on_chip": len(dep.placed_tensors),
                 "overflow_tensors": dep.overflow_tensors, "overflow": cfg.overflow,
                 "digital_parts": "everything not in --parts" + (f", layers outside {list(cfg.layers)}"
                                                                 if cfg.layers is not None else "")}
    return DeployResult(out=str(out), model=cfg.model, family=family, device_idn=idn, clean_ppl=clean_ppl,
                        clean_load_cv=clean_load.cv, clean_load_max_mean=clean_load.max_mean, emulated_ppl=emulated,
                        rounds=rounds, placement=placement, noise_model=noise.name,
                        seconds=time.perf_counter() - t_all)


def _emulated_ppl(dep: Deployment, noise: NoiseModel, ids: torch.Tensor, wcfg: WindowConfig) -> float:
    """Perplexity with the chip-held parts perturbed by the noise model instead (for comparison)."""
    held = {at.name: at.param.detach().clone() for at in dep.tensors}
    try:
        with torch.no_grad():
            for at in dep.tensors:
                at.param.copy_(dep.clean[at.name])
        dep.emulate_matrices(dep.on_chip, noise, dep.cfg.seed)
        return perplexity(dep.model, ids, wcfg).ppl
    finally:
        with torch.no_grad():
            for at in dep.tensors:
                at.param.copy_(held[at.name])
