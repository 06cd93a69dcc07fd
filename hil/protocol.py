"""The chip tester's command set: building commands and parsing replies, with no I/O.

Kept apart from transports and drivers (as in QCoDeS' message builders) so that every byte
on the wire is unit-tested without a device. See docs/protocol.md for the full reference.

Framing: one command per line (``\\n``). Every command gets exactly one reply: an ASCII line
(``OK``, a value, or ``ERR <code>,"<message>"``) or a binary block in IEEE 488.2 definite-length
form followed by a CRC-32 of the payload: ``#<d><len><payload>,<crc32 as 8 hex digits>\\n``.
Commands that carry data (program targets) append the same block after the header fields.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

TERM = b"\n"
F32 = np.dtype("<f4")
I16 = np.dtype("<i2")
I8 = np.dtype("i1")


class ProtocolError(RuntimeError):
    """The bytes on the wire do not follow the protocol (bad framing, checksum, field)."""


class DeviceError(RuntimeError):
    """The device answered ``ERR code,"message"``."""

    def __init__(self, code: int, message: str, command: str = "") -> None:
        self.code = code
        self.message = message
        self.command = command
        where = f" (command {command!r})" if command else ""
        super().__init__(f"device error {code}: {message}{where}")


# SCPI-style error codes used by the device.
E_COMMAND = -100  # unknown command / header
E_PARAM = -108  # wrong parameter count or type
E_RANGE = -222  # data out of range (geometry, conductance)
E_SAFETY = -224  # programming conditions outside the chip profile's safe limits
E_CHECKSUM = -350  # payload checksum mismatch
E_BLOCK = -160  # malformed binary block


@dataclass(frozen=True)
class Region:
    """A rectangle of cells inside one tile: the unit of every block operation."""

    tile: int
    row0: int
    col0: int
    nrows: int
    ncols: int

    @property
    def size(self) -> int:
        return self.nrows * self.ncols

    def fields(self) -> str:
        return f"{self.tile},{self.row0},{self.col0},{self.nrows},{self.ncols}"


@dataclass(frozen=True)
class ProgramSettings:
    """Write-verify settings sent with PROG:CONF (checked against the chip profile)."""

    tolerance_us: float = 0.2
    max_pulses: int = 20
    v_min: float = 0.5
    v_max: float = 2.5
    width_min_ns: float = 20.0
    width_max_ns: float = 200.0
    i_compliance_a: float = 200e-6

    def fields(self) -> str:
        return (f"{self.tolerance_us:.6g},{self.max_pulses},{self.v_min:.6g},{self.v_max:.6g},"
                f"{self.width_min_ns:.6g},{self.width_max_ns:.6g},{self.i_compliance_a:.6g}")

    @classmethod
    def parse(cls, text: str) -> ProgramSettings:
        parts = text.split(",")
        if len(parts) != 7:
            raise ValueError(f"PROG:CONF needs 7 fields, got {len(parts)}")
        t, n, v0, v1, w0, w1, ic = parts
        return cls(float(t), int(n), float(v0), float(v1), float(w0), float(w1), float(ic))


# ---- binary blocks ------------------------------------------------------------------------
def crc32(payload: bytes | memoryview) -> int:
    return zlib.crc32(payload) & 0xFFFFFFFF


def encode_block(payload: bytes | memoryview) -> bytes:
    n = len(payload)
    digits = str(n)
    if len(digits) > 9:
        raise ProtocolError(f"block of {n} bytes too large for a definite-length header")
    return b"".join([b"#", str(len(digits)).encode(), digits.encode(), bytes(payload),
                     b",", f"{crc32(payload):08x}".encode(), TERM])


def block_header_length(first_two: bytes) -> int:
    """Number of length digits announced by ``#<d>``."""
    if len(first_two) != 2 or first_two[:1] != b"#" or not first_two[1:2].isdigit() or first_two[1:2] == b"0":
        raise ProtocolError(f"expected a definite-length block header '#<1-9>', got {first_two!r}")
    return int(first_two[1:2])


def check_block_trailer(payload: bytes | memoryview, trailer: bytes) -> None:
    """Validate ``,<crc8hex>\\n`` against the payload."""
    if len(trailer) != 10 or trailer[:1] != b"," or trailer[-1:] != TERM:
        raise ProtocolError(f"malformed block trailer {trailer!r}; expected ',<8 hex digits>\\n'")
    try:
        got = int(trailer[1:9], 16)
    except ValueError:
        raise ProtocolError(f"block checksum {trailer[1:9]!r} is not hexadecimal") from None
    want = crc32(payload)
    if got != want:
        raise ProtocolError(f"block checksum mismatch: received {got:08x}, computed {want:08x}")


def decode_block(data: bytes) -> bytes:
    """Decode one complete framed block (used in tests and by in-memory transports)."""
    d = block_header_length(data[:2])
    n = int(data[2:2 + d])
    start = 2 + d
    payload = data[start:start + n]
    if len(payload) != n:
        raise ProtocolError(f"block announced {n} bytes, only {len(payload)} present")
    check_block_trailer(payload, data[start + n:start + n + 10])
    return payload


# ---- command builders ---------------------------------------------------------------------
def cmd(text: str) -> bytes:
    return text.encode("ascii") + TERM


def cmd_idn() -> bytes:
    return cmd("*IDN?")


def cmd_program_block(txn: str, region: Region, targets_us: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(targets_us, dtype=F32).reshape(-1)
    if arr.size != region.size:
        raise ValueError(f"targets have {arr.size} values, region {region} holds {region.size}")
    if not txn or any(c in txn for c in ",#\n "):
        raise ValueError(f"transaction id {txn!r} must be non-empty without ',', '#', spaces or newlines")
    return b"PROG:BLK " + f"{txn},{region.fields()},".encode() + encode_block(arr.tobytes())


def cmd_read_block(region: Region) -> bytes:
    return cmd(f"READ:BLK? {region.fields()}")


def cmd_read_cell(tile: int, row: int, col: int) -> bytes:
    return cmd(f"READ:CELL? {tile},{row},{col}")


def cmd_stuck_block(region: Region) -> bytes:
    return cmd(f"CHIP:STUCK? {region.fields()}")


# ---- reply parsing ------------------------------------------------------------------------
def parse_status(line: bytes, command: str = "") -> str:
    """Return the reply text, raising DeviceError for ``ERR`` replies."""
    try:
        text = line.decode("ascii").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ProtocolError(f"non-ASCII reply {line[:40]!r} to {command!r}") from None
    if text.startswith("ERR "):
        code_s, _, msg = text[4:].partition(",")
        try:
            code = int(code_s)
        except ValueError:
            raise ProtocolError(f"malformed error reply {text!r}") from None
        raise DeviceError(code, msg.strip().strip('"'), command)
    return text


def error_reply(code: int, message: str) -> bytes:
    return f'ERR {code},"{message}"'.encode("ascii", "replace") + TERM


def program_reply_payload(pulses: np.ndarray, verified: np.ndarray) -> bytes:
    return np.asarray(pulses, I16).tobytes() + np.asarray(verified, I8).tobytes()


def parse_program_reply(payload: bytes, n: int) -> tuple[np.ndarray, np.ndarray]:
    if len(payload) != 3 * n:
        raise ProtocolError(f"program reply has {len(payload)} bytes, expected {3 * n} for {n} cells")
    pulses = np.frombuffer(payload, I16, count=n).copy()
    verified = np.frombuffer(payload, I8, count=n, offset=2 * n).copy()
    return pulses, verified


def parse_f32_block(payload: bytes, n: int, what: str = "read") -> np.ndarray:
    if len(payload) != 4 * n:
        raise ProtocolError(f"{what} reply has {len(payload)} bytes, expected {4 * n} for {n} cells")
    return np.frombuffer(payload, F32).copy()
