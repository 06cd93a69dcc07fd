"""Driver throughput over the TCP transport: block reads vs per-cell queries, programming, and the
transport's own limit (raw loopback bytes at the same block size).

Run: python -m bench.bench_driver
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import numpy as np

from hil import protocol as P
from hil.driver import ChipDriver
from hil.profile import ChipProfile
from hil.sim.chip import SimChip, chip_truth
from hil.sim.device import SimDevice
from hil.sim.server import SimTCPServer
from hil.transport import SerialTransport, VisaTransport

PROFILE = ChipProfile(tiles=4, rows=256, cols=256, block_max_cells=65536)


@dataclass
class Row:
    what: str
    cells_per_s: float
    note: str = ""


def _raw_tcp_limit(nbytes: int, reps: int) -> float:
    """Bytes/s a plain socket moves from a server thread to a client on loopback (no protocol)."""
    payload = b"\0" * nbytes
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            for _ in range(reps):
                conn.recv(16)
                conn.sendall(payload)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    cli = socket.create_connection(("127.0.0.1", port))
    buf = bytearray(nbytes)
    t0 = time.perf_counter()
    for _ in range(reps):
        cli.sendall(b"go\n")
        view, got = memoryview(buf), 0
        while got < nbytes:
            got += cli.recv_into(view[got:])
    dt = time.perf_counter() - t0
    cli.close()
    srv.close()
    return nbytes * reps / dt


def run(reps: int = 20) -> list[Row]:
    rows: list[Row] = []
    dev = SimDevice(SimChip(PROFILE, chip_truth("pcm-chip"), seed=0))
    block = P.Region(0, 0, 0, 256, 256)
    with SimTCPServer(dev) as srv:
        for name, tr in (("VISA TCPIP SOCKET (pyvisa-py)", VisaTransport(srv.visa_resource)),
                         ("pyserial socket://", SerialTransport(srv.serial_url))):
            with ChipDriver(tr) as drv:
                drv.configure_programming(P.ProgramSettings())
                t0 = time.perf_counter()
                for tile in range(PROFILE.tiles):
                    drv.program_block(P.Region(tile, 0, 0, 256, 256),
                                      np.random.default_rng(tile).uniform(0, 25, 65536).astype(np.float32),
                                      txn=f"bench-{name[:4]}-{tile}-{time.time_ns()}")
                dt = time.perf_counter() - t0
                rows.append(Row(f"program, write-verify, {name}", PROFILE.cells / dt, "65,536-cell blocks"))
                drv.read_block(block)
                t0 = time.perf_counter()
                for i in range(reps):
                    drv.wait_until(drv.clock() + 1e-3) if i % 5 == 0 else None
                    drv.read_block(block)
                dt = time.perf_counter() - t0
                rows.append(Row(f"block read, {name}", reps * block.size / dt, "65,536-cell blocks"))
                n = 300
                t0 = time.perf_counter()
                for i in range(n):
                    drv.read_cell(0, i // 256, i % 256)
                rows.append(Row(f"per-cell query, {name}", n / (time.perf_counter() - t0), "baseline"))
    t0 = time.perf_counter()
    for _ in range(reps):
        dev.chip.read(block)
    rows.append(Row("simulated chip physics alone (no transport)", reps * block.size / (time.perf_counter() - t0)))
    raw = _raw_tcp_limit(4 * block.size + 20, reps)
    rows.append(Row("raw TCP loopback limit (float32 payload, no protocol)", raw / 4, f"{raw / 1e9:.2f} GB/s"))
    return rows


def main() -> list[Row]:
    rows = run()
    print(f"{'measurement':60s} {'cells/s':>14s}  note")
    for r in rows:
        print(f"{r.what:60s} {r.cells_per_s:14,.0f}  {r.note}")
    return rows


if __name__ == "__main__":
    main()
