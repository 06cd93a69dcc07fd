"""The chip driver: one interface over any transport, batch operations, safety, retries.

Every command on the hot path is a block operation and is safe to repeat: program blocks carry a
transaction id the device remembers, reads are pure. So on a timeout, a broken link or a
corrupted reply the driver reconnects and re-sends, a bounded number of times.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from hil import protocol as P
from hil.profile import ChipProfile, SafetyError
from hil.transport import SerialTransport, Transport, TransportError, VisaTransport, read_reply
from noise_fit.model import NoiseModel


class DeviceStringError(ValueError):
    """An unknown or malformed --device string."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # total tries per command
    backoff_s: float = 0.05  # doubled after each failure


class ChipDriver:
    """Talks to one chip tester. Thread-safe: a lock per transport serialises commands."""

    def __init__(self, transport: Transport, retry: RetryPolicy | None = None,
                 on_retry: Callable[[str], None] | None = None) -> None:
        self.transport = transport
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        self.retries = 0
        self._lock = threading.RLock()
        self._profile: ChipProfile | None = None
        self._connected = False

    # ---- connection ---------------------------------------------------------------------------
    def connect(self) -> ChipDriver:
        with self._lock:
            self.transport.open()
            self._connected = True
        return self

    def close(self) -> None:
        with self._lock:
            self.transport.close()
            self._connected = False

    def __enter__(self) -> ChipDriver:
        return self.connect() if not self._connected else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reconnect(self) -> None:
        self.transport.close()
        self.transport.open()

    def _exchange(self, data: bytes, command: str) -> tuple[bytes | None, bytes | None]:
        """Send one command, return its reply; reconnect and re-send on link failures."""
        delay = self.retry.backoff_s
        last: Exception | None = None
        with self._lock:
            for attempt in range(self.retry.attempts):
                try:
                    if attempt:
                        self._reconnect()
                    self.transport.write(data)
                    line, block = read_reply(self.transport)
                    if line is not None:
                        P.parse_status(line, command)  # raises DeviceError (not retried)
                    return line, block
                except (TransportError, P.ProtocolError) as e:
                    last = e
                    self.retries += 1
                    if self.on_retry:
                        self.on_retry(f"{command}: {e} (attempt {attempt + 1}/{self.retry.attempts})")
                    time.sleep(delay)
                    delay *= 2
            raise TransportError(
                f"{self.transport.name}: {command!r} failed after {self.retry.attempts} attempts: {last}")

    def ask(self, text: str) -> str:
        line, block = self._exchange(P.cmd(text), text)
        if line is None:
            raise P.ProtocolError(f"{text!r}: expected a text reply, got a binary block")
        return P.parse_status(line, text)

    def ask_block(self, data: bytes, command: str) -> bytes:
        line, block = self._exchange(data, command)
        if block is None:
            raise P.ProtocolError(f"{command!r}: expected a binary block, got {line!r}")
        return block

    # ---- identity and capabilities --------------------------------------------------------------
    def idn(self) -> str:
        return self.ask("*IDN?")

    def profile(self) -> ChipProfile:
        if self._profile is None:
            tiles, rows, cols = (int(x) for x in self.ask("CHIP:GEOM?").split(","))
            g_min, g_max = (float(x) for x in self.ask("CHIP:GRANGE?").split(","))
            v, i, w0, w1, npulse, bmax = self.ask("CHIP:LIM?").split(",")
            self._profile = ChipProfile(tiles, rows, cols, g_min, g_max, float(v), float(i), float(w0), float(w1),
                                        int(npulse), int(bmax))
        return self._profile

    def errors(self) -> list[tuple[int, str]]:
        """Drain the device error queue."""
        out = []
        for _ in range(64):
            code_s, _, msg = self.ask("SYST:ERR?").partition(",")
            if int(code_s) == 0:
                break
            out.append((int(code_s), msg.strip('"')))
        return out

    def truth(self) -> NoiseModel | None:
        """The ground-truth noise model of a simulated chip (None for real hardware)."""
        try:
            payload = self.ask_block(P.cmd("SYST:TRUTH?"), "SYST:TRUTH?")
        except P.DeviceError:
            return None
        return NoiseModel.from_dict(json.loads(payload), where="device SYST:TRUTH?")

    # ---- clock ------------------------------------------------------------------------------------
    def clock(self) -> float:
        return float(self.ask("CLK?"))

    def wait_until(self, t_abs: float) -> float:
        """Wait until the device clock reads t_abs (a simulated clock jumps; a real one is waited for)."""
        if self.ask("CLK:MODE?").upper() == "SIM":
            return float(self.ask(f"CLK:WAIT {t_abs:.9f}"))
        while (now := self.clock()) < t_abs:
            time.sleep(min(1.0, t_abs - now))
        return now

    # ---- programming and reading ------------------------------------------------------------------
    def configure_programming(self, s: P.ProgramSettings) -> None:
        self.profile().check_settings(s)  # refused here, before anything is sent
        self.ask(f"PROG:CONF {s.fields()}")

    def check_region(self, r: P.Region) -> None:
        """Checked here, against the profile the device reported, before anything is sent."""
        self.profile().check_region(r)

    def program_block(self, region: P.Region, targets_us: np.ndarray, txn: str) -> tuple[np.ndarray, np.ndarray]:
        """Write-verify one block (NaN targets are skipped). Returns (pulses, verified) per cell; verified is
        1/0, or -1 for skipped cells. Safe to retry (txn id)."""
        self.check_region(region)
        p = self.profile()
        t = np.asarray(targets_us, dtype=np.float32).reshape(-1)
        given = t[~np.isnan(t)]  # NaN: leave the cell untouched
        if np.isinf(given).any() or (given.size and (given.min() < p.g_min or given.max() > p.g_max)):
            raise SafetyError(f"targets must be finite (NaN to skip a cell) and within the chip range "
                              f"[{p.g_min}, {p.g_max}] µS")
        if given.size == 0:
            return np.zeros(region.size, np.int16), np.full(region.size, -1, np.int8)
        payload = self.ask_block(P.cmd_program_block(txn, region, t), f"PROG:BLK {txn}")
        return P.parse_program_reply(payload, region.size)

    def read_block(self, region: P.Region) -> np.ndarray:
        self.check_region(region)
        return P.parse_f32_block(self.ask_block(P.cmd_read_block(region), "READ:BLK?"), region.size)

    def read_cell(self, tile: int, row: int, col: int) -> float:
        """Debug path (and the benchmark baseline): one cell per round trip."""
        return float(self.ask(f"READ:CELL? {tile},{row},{col}"))

    def stuck_block(self, region: P.Region) -> np.ndarray:
        self.check_region(region)
        payload = self.ask_block(P.cmd_stuck_block(region), "CHIP:STUCK?")
        return np.frombuffer(payload, P.I8).copy()


def tile_regions(profile: ChipProfile, tiles: list[int], rows: int, cols: int,
                 block_rows: int | None = None) -> Iterator[P.Region]:
    """Split the measured area (rows x cols at the corner of each tile) into blocks the chip accepts."""
    br = block_rows or max(1, min(rows, profile.block_max_cells // max(cols, 1)))
    for t in tiles:
        for r0 in range(0, rows, br):
            yield P.Region(t, r0, 0, min(br, rows - r0), cols)


def transport_for(device: str, timeout_s: float = 5.0) -> Transport:
    """``visa:RESOURCE`` or ``serial:PORT`` (a device path, a pty, or socket://host:port)."""
    kind, _, rest = device.partition(":")
    if kind == "visa" and rest:
        return VisaTransport(rest, timeout_s=timeout_s)
    if kind == "serial" and rest:
        return SerialTransport(rest, timeout_s=timeout_s)
    raise DeviceStringError(
        f"device {device!r} not understood: use 'sim', 'sim:HOST:PORT', 'visa:RESOURCE' "
        "(e.g. visa:TCPIP::192.168.0.5::5025::SOCKET) or 'serial:PORT' (e.g. serial:/dev/ttyUSB0)")
