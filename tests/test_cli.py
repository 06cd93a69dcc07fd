"""The CLI is thin, but its contract is real: exit codes, JSON output, a server a second process reaches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import h5py
from typer.testing import CliRunner

from hil.cli import app

runner = CliRunner()
SMALL = ["--rows", "8", "--cols", "64", "--times", "1,3600", "--repeats", "2"]


def test_measure_json_and_fit(tmp_path) -> None:
    out = tmp_path / "d.h5"
    r = runner.invoke(app, ["measure", "--device", "sim", "--out", str(out), "--json", *SMALL])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["cells"] == 4 * 8 * 64 and summary["passes_done"] == 4
    with h5py.File(out) as f:
        assert f.attrs["complete"]


def test_errors_are_one_clear_line_and_exit_2(tmp_path) -> None:
    r = runner.invoke(app, ["measure", "--device", "gpib9", "--out", str(tmp_path / "d.h5")])
    assert r.exit_code == 2 and "not understood" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["measure", "--v-max", "9", "--out", str(tmp_path / "d.h5"), *SMALL])
    assert r.exit_code == 2 and "exceeds the profile limit" in r.output
    assert not (tmp_path / "d.h5").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sim_server_process_reached_by_measure(tmp_path) -> None:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hil", "sim-server", "--port", str(port), "--tiles", "1",
                             "--rows", "64", "--cols", "64"], env={**os.environ, "PYTHONPATH": os.getcwd()},
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        r = runner.invoke(app, ["measure", "--device", f"sim:127.0.0.1:{port}", "--out", str(tmp_path / "d.h5"),
                                "--json", "--rows", "8", "--cols", "64", "--times", "1", "--repeats", "2"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["cells"] == 8 * 64
    finally:
        proc.terminate()
        proc.wait(timeout=10)
