"""`hil measure`: the dump format, faults mid-run, kill and --resume, and bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from hil.measure import MeasureConfig, MeasureError, run_measurement
from hil.profile import ChipProfile
from hil.protocol import ProgramSettings
from hil.sim.server import FaultPlan, SimTCPServer
from noise_fit import dump_schema as S

from .conftest import SMALL, make_device

SIM_PROFILE = ChipProfile(tiles=2, rows=64, cols=64, block_max_cells=1024)


def _cfg(out: Path, device: str = "sim", **kw) -> MeasureConfig:
    base = dict(device=device, out=str(out), rows=32, cols=64, times_s=(1.0, 60.0, 3600.0), repeats=2,
                seed=4, sim_seed=9, sim_profile=SIM_PROFILE, timeout_s=1.0, block_rows=8)
    base.update(kw)
    return MeasureConfig(**base)


def _dump_content(path: Path) -> dict:
    out: dict = {}
    with h5py.File(path, "r") as f:
        for k, v in f.attrs.items():
            if k not in ("created", "run_id", "device"):  # the server address differs
                out[f"@{k}"] = v
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def _assert_same_dump(a: Path, b: Path) -> None:
    da, db = _dump_content(a), _dump_content(b)
    assert da.keys() == db.keys()
    for k in da:
        if isinstance(da[k], np.ndarray):
            np.testing.assert_array_equal(da[k], db[k], err_msg=k)
        else:
            assert da[k] == db[k], k


def test_dump_is_self_describing(tmp_path) -> None:
    res = run_measurement(_cfg(tmp_path / "d.h5"))
    assert res.cells == 2 * 32 * 64 and res.verified_fraction > 0.97 and res.passes_done == 6
    with h5py.File(tmp_path / "d.h5", "r") as f:
        assert f.attrs["schema"] == S.SCHEMA and f.attrs["schema_version"] == S.SCHEMA_VERSION
        assert f.attrs["complete"] and f.attrs["software_version"] and "SIMCHIP" in f.attrs["device_idn"]
        assert "pcm-joshi2020" in f.attrs["truth"]
        for name, (dtype, units) in S.DATASETS.items():
            assert f[name].attrs["units"] == units, name
            assert f[name].dtype == np.dtype(dtype), name
        assert f["reads/g"].shape == (3, 2, res.cells)
        assert f["reads/g"].compression == "gzip" and f["reads/g"].chunks is not None
        assert not np.isnan(f["reads/g"][()]).any()
        levels = np.linspace(0, 25, 16, dtype=np.float32).round(4)
        assert set(np.unique(f["cells/g_target"][()]).round(4)) == set(levels)
        assert np.all(np.diff(f["reads/clock"][()].reshape(-1)) > 0)
    # drift: mean conductance falls with time
    assert res.mean_g_by_time[0] > res.mean_g_by_time[1] > res.mean_g_by_time[2]


def test_existing_output_is_never_overwritten_silently(tmp_path) -> None:
    out = tmp_path / "d.h5"
    out.write_bytes(b"precious")
    with pytest.raises(MeasureError, match="already exists"):
        run_measurement(_cfg(out))
    assert out.read_bytes() == b"precious"


def _run_against_server(out: Path, faults: FaultPlan | None = None, resume: bool = False, dev=None):
    dev = dev or make_device(seed=9, profile=SIM_PROFILE)
    with SimTCPServer(dev, faults=faults) as srv:
        res = run_measurement(_cfg(out, device=f"sim:127.0.0.1:{srv.port}", resume=resume))
    return res, dev


def test_dropped_connections_mid_run_give_the_same_dump(tmp_path) -> None:
    ref, _ = _run_against_server(tmp_path / "ref.h5")
    # command numbers chosen to land in programming (reply lost after execution) and in reads
    plan = FaultPlan(drop_after_exec_at={12}, drop_at={40}, corrupt_at={55}, delay_at={70}, delay_s=1.5)
    res, _ = _run_against_server(tmp_path / "faulty.h5", faults=plan)
    assert len(plan.fired) == 4 and res.retries >= 4
    _assert_same_dump(tmp_path / "ref.h5", tmp_path / "faulty.h5")


def test_lost_link_then_resume_gives_the_same_dump(tmp_path) -> None:
    _run_against_server(tmp_path / "ref.h5")
    dev = make_device(seed=9, profile=SIM_PROFILE)
    plan = FaultPlan(drop_at=set(range(50, 80)))  # the link stays down past every retry
    with pytest.raises(Exception, match="failed after"):
        _run_against_server(tmp_path / "cut.h5", faults=plan, dev=dev)
    with h5py.File(tmp_path / "cut.h5", "r") as f:
        partial_done = int(f["reads/done"][()].sum()) + int(f["program/done"][()].sum())
        assert 0 < partial_done and not f.attrs["complete"]
    res, _ = _run_against_server(tmp_path / "cut.h5", resume=True, dev=dev)
    assert res.resumed
    _assert_same_dump(tmp_path / "ref.h5", tmp_path / "cut.h5")


def test_killed_process_resumes_against_the_same_chip(tmp_path) -> None:
    """A real kill -9 of `hil measure` mid-run; the chip (server) keeps its state, as hardware does."""
    _run_against_server(tmp_path / "ref.h5")
    dev = make_device(seed=9, profile=SIM_PROFILE)
    plan = FaultPlan(delay_at={45}, delay_s=30.0)  # hold the process mid-run so it can be killed there
    out = tmp_path / "killed.h5"
    with SimTCPServer(dev, faults=plan) as srv:
        cfg = _cfg(out, device=f"sim:127.0.0.1:{srv.port}")
        code = (
            "from hil.measure import MeasureConfig, run_measurement; "
            f"cfg = MeasureConfig(device={cfg.device!r}, out={cfg.out!r}, rows=32, cols=64, "
            "times_s=(1.0, 60.0, 3600.0), repeats=2, seed=4, sim_seed=9, timeout_s=60.0, block_rows=8); "
            "run_measurement(cfg)"
        )
        proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.getcwd()})
        deadline = time.time() + 60
        while not plan.fired and time.time() < deadline:
            time.sleep(0.05)
        assert plan.fired, "the measurement never reached the held command"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        plan.delay_at.clear()
        res = run_measurement(_cfg(out, device=f"sim:127.0.0.1:{srv.port}", resume=True))
    assert res.resumed
    _assert_same_dump(tmp_path / "ref.h5", out)


def test_in_process_sim_resumes_from_its_nonvolatile_state(tmp_path) -> None:
    run_measurement(_cfg(tmp_path / "ref.h5"))
    out = tmp_path / "d.h5"

    def interrupt(stage: str, done: int, total: int) -> None:
        if stage == "read" and done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_measurement(_cfg(out), progress=interrupt)
    run_measurement(_cfg(out, resume=True))
    _assert_same_dump(tmp_path / "ref.h5", out)


@pytest.mark.parametrize(("kw", "match"), [
    (dict(device="gpib7"), "not understood"),
    (dict(tiles=(0, 5)), "not on the chip"),
    (dict(rows=500), "does not fit a tile"),
    (dict(settings=ProgramSettings(v_max=4.0)), "refused before touching the chip"),
    (dict(times_s=(60.0, 1.0)), "increasing"),
])
def test_bad_input_rejected_before_any_cell_is_touched(tmp_path, kw, match) -> None:
    dev = make_device(seed=1, profile=SMALL)
    with SimTCPServer(dev) as srv:
        cfg = _cfg(tmp_path / "d.h5", device=kw.pop("device", f"sim:127.0.0.1:{srv.port}"), **kw)
        with pytest.raises(Exception, match=match):
            run_measurement(cfg)
    assert not dev.chip.programmed.any()
    assert not (tmp_path / "d.h5").exists()


def test_unwritable_output_path(tmp_path) -> None:
    with pytest.raises(MeasureError, match="does not exist"):
        run_measurement(_cfg(tmp_path / "nope" / "d.h5"))


def test_overwrite_starts_from_a_fresh_simulated_chip(tmp_path) -> None:
    """A rerun with --overwrite must not inherit the earlier run's chip state (snapshot or journal)."""
    run_measurement(_cfg(tmp_path / "ref.h5"))
    out = tmp_path / "d.h5"
    run_measurement(_cfg(out))
    assert (tmp_path / "d.h5.simchip.npz.journal").exists()
    run_measurement(_cfg(out, overwrite=True))
    _assert_same_dump(tmp_path / "ref.h5", out)
