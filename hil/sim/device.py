"""The simulated chip tester's firmware: parses the wire protocol and drives `SimChip`.

Transport-agnostic: `CommandReader` splits a byte stream into commands (with their binary
blocks), `SimDevice.handle` turns one command into one reply. Both servers (TCP, pty) and the
in-process loopback transport share them, so every path speaks exactly the same protocol.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from hil import protocol as P
from hil.profile import ChipProfile, SafetyError
from hil.sim.chip import SimChip

SIM_VERSION = "0.1.0"
TXN_CACHE = 4096  # program replies remembered for idempotent retries


class CommandReader:
    """Incremental parser of the command stream: yields (header, payload-or-None, error-or-None)."""

    def __init__(self, recv: Callable[[int], bytes]) -> None:
        self._recv = recv
        self._buf = bytearray()

    def _fill(self) -> None:
        data = self._recv(1 << 20)
        if not data:
            raise EOFError
        self._buf += data

    def _need(self, n: int) -> None:
        while len(self._buf) < n:
            self._fill()

    def next(self) -> tuple[str, bytes | None, str | None]:
        while True:
            i_nl = self._buf.find(b"\n")
            i_hash = self._buf.find(b"#")
            if i_hash != -1 and (i_nl == -1 or i_hash < i_nl):
                return self._block_command(i_hash)
            if i_nl != -1:
                line = bytes(self._buf[:i_nl])
                del self._buf[:i_nl + 1]
                return line.decode("ascii", "replace").strip(), None, None
            if len(self._buf) > 4096:  # a header that never ends is garbage
                self._buf.clear()
                return "", None, "command header longer than 4096 bytes without a newline"
            self._fill()

    def _block_command(self, i_hash: int) -> tuple[str, bytes | None, str | None]:
        self._need(i_hash + 2)
        header = bytes(self._buf[:i_hash]).decode("ascii", "replace").strip()
        try:
            d = P.block_header_length(bytes(self._buf[i_hash:i_hash + 2]))
            self._need(i_hash + 2 + d)
            n = int(bytes(self._buf[i_hash + 2:i_hash + 2 + d]))
        except (P.ProtocolError, ValueError) as e:
            self._discard_line()
            return header, None, f"malformed block header: {e}"
        start = i_hash + 2 + d
        self._need(start + n + 10)
        payload = bytes(self._buf[start:start + n])
        trailer = bytes(self._buf[start + n:start + n + 10])
        del self._buf[:start + n + 10]
        try:
            P.check_block_trailer(payload, trailer)
        except P.ProtocolError as e:
            return header, None, str(e)
        return header, payload, None

    def _discard_line(self) -> None:
        i = self._buf.find(b"\n")
        del self._buf[: (i + 1) if i != -1 else len(self._buf)]


class SimDevice:
    """One simulated tester: a chip, its programming settings, error queue and idempotency cache.

    Thread-safe: a lock serialises commands from several connections, as a real instrument does.
    """

    def __init__(self, chip: SimChip, serial: str = "SIM0001", state_path: Path | None = None) -> None:
        self.chip = chip
        self.serial = serial
        self.settings = P.ProgramSettings()
        self.errors: list[tuple[int, str]] = []
        self.txn_cache: OrderedDict[str, bytes] = OrderedDict()
        self.lock = threading.Lock()
        self.state_path = state_path
        if state_path is not None:
            sp = Path(state_path)
            if sp.exists() or Path(str(sp) + ".journal").exists():
                chip.load_state(sp)
            chip.save_state(sp)  # compact: a fresh snapshot, an empty journal

    @property
    def profile(self) -> ChipProfile:
        return self.chip.profile

    def idn(self) -> str:
        return f"ROMER-HIL,SIMCHIP-{self.chip.truth.name.upper()},{self.serial},{SIM_VERSION}"

    def handle(self, header: str, payload: bytes | None, framing_error: str | None = None) -> bytes:
        with self.lock:
            if framing_error is not None:
                code = P.E_CHECKSUM if "checksum" in framing_error else P.E_BLOCK
                return self._err(code, framing_error)
            try:
                return self._dispatch(header, payload)
            except SafetyError as e:
                return self._err(P.E_SAFETY, str(e))
            except (ValueError, IndexError) as e:
                return self._err(P.E_RANGE if "within" in str(e) or "outside" in str(e) or "exceeds" in str(e)
                                 else P.E_PARAM, f"{header.split(' ')[0]}: {e}")

    def _err(self, code: int, msg: str) -> bytes:
        self.errors.append((code, msg))
        del self.errors[:-32]
        return P.error_reply(code, msg)

    def _region(self, fields: list[str]) -> P.Region:
        if len(fields) != 5:
            raise ValueError(f"expected 5 region fields tile,row0,col0,nrows,ncols, got {len(fields)}")
        region = P.Region(*(int(f) for f in fields))
        self.chip.check_region(region)
        return region

    def _dispatch(self, header: str, payload: bytes | None) -> bytes:
        name, _, arg = header.partition(" ")
        name = name.upper()
        args = [a for a in arg.split(",")] if arg else []
        chip, prof = self.chip, self.profile
        if name == "*IDN?":
            return P.cmd(self.idn())
        if name == "*RST":
            self.settings = P.ProgramSettings()
            return P.cmd("OK")
        if name == "*CLS":
            self.errors.clear()
            return P.cmd("OK")
        if name == "SYST:ERR?":
            if not self.errors:
                return P.cmd('0,"No error"')
            code, msg = self.errors.pop(0)
            return P.cmd(f'{code},"{msg}"')
        if name == "SYST:TRUTH?":
            return P.encode_block(chip.truth.to_json().encode())
        if name == "CHIP:GEOM?":
            return P.cmd(f"{prof.tiles},{prof.rows},{prof.cols}")
        if name == "CHIP:GRANGE?":
            return P.cmd(f"{prof.g_min:.9g},{prof.g_max:.9g}")
        if name == "CHIP:LIM?":
            return P.cmd(f"{prof.v_prog_max:.9g},{prof.i_prog_max:.9g},{prof.width_min_ns:.9g},"
                         f"{prof.width_max_ns:.9g},{prof.max_pulses},{prof.block_max_cells}")
        if name == "CLK?":
            return P.cmd(f"{chip.clock:.9f}")
        if name == "CLK:MODE?":
            return P.cmd("SIM")
        if name == "CLK:WAIT":
            return P.cmd(f"{chip.advance_to(float(args[0])):.9f}")
        if name == "PROG:CONF":
            s = P.ProgramSettings.parse(arg)
            prof.check_settings(s)
            self.settings = s
            return P.cmd("OK")
        if name == "PROG:CONF?":
            return P.cmd(self.settings.fields())
        if name == "PROG:BLK":
            if payload is None:
                raise ValueError("PROG:BLK needs a binary block of float32 targets")
            txn, region_fields = args[0], args[1:6]
            if txn in self.txn_cache:  # a retry of a command already executed: same answer, no pulses
                return self.txn_cache[txn]
            region = self._region(region_fields)
            targets = P.parse_f32_block(payload, region.size, "PROG:BLK targets")
            pulses, verified = chip.program(region, targets, self.settings)
            reply = P.encode_block(P.program_reply_payload(pulses, verified))
            self.txn_cache[txn] = reply
            while len(self.txn_cache) > TXN_CACHE:
                self.txn_cache.popitem(last=False)
            if self.state_path is not None:
                chip.journal_program(Path(self.state_path), region)
            return reply
        if name == "READ:BLK?":
            return P.encode_block(chip.read(self._region(args)).tobytes())
        if name == "READ:CELL?":
            t, r, c = (int(a) for a in args)
            return P.cmd(f"{float(chip.read(self._region([str(t), str(r), str(c), '1', '1']))[0]):.6f}")
        if name == "CHIP:STUCK?":
            return P.encode_block(chip.stuck_report(self._region(args)).tobytes())
        return self._err(P.E_COMMAND, f"unknown command {name!r}")

