"""The wire protocol, byte for byte, with no I/O (command building is separate from sending)."""

from __future__ import annotations

import numpy as np
import pytest

from hil import protocol as P
from hil.sim.device import CommandReader


def test_block_round_trip_and_header() -> None:
    payload = bytes(range(256)) * 3
    framed = P.encode_block(payload)
    assert framed.startswith(b"#3768")
    assert framed.endswith(b"\n")
    assert P.decode_block(framed) == payload


def test_block_checksum_mismatch_detected() -> None:
    framed = bytearray(P.encode_block(b"\x00\x01\n\x02#"))
    framed[6] ^= 0x01
    with pytest.raises(P.ProtocolError, match="checksum mismatch"):
        P.decode_block(bytes(framed))


@pytest.mark.parametrize("bad", [b"#0", b"#a", b"x5", b"#"])
def test_bad_block_header(bad: bytes) -> None:
    with pytest.raises(P.ProtocolError):
        P.block_header_length(bad)


def test_program_command_bytes() -> None:
    r = P.Region(1, 2, 3, 2, 2)
    data = P.cmd_program_block("run7-p0", r, np.array([0, 1, 2.5, 25], np.float32))
    assert data.startswith(b"PROG:BLK run7-p0,1,2,3,2,2,#216")
    assert P.decode_block(data[data.index(b"#"):]) == np.array([0, 1, 2.5, 25], "<f4").tobytes()
    with pytest.raises(ValueError, match="region"):
        P.cmd_program_block("t", r, np.zeros(3))
    with pytest.raises(ValueError, match="transaction id"):
        P.cmd_program_block("a,b", r, np.zeros(4))


def test_simple_commands() -> None:
    assert P.cmd_idn() == b"*IDN?\n"
    assert P.cmd_read_block(P.Region(0, 0, 0, 4, 8)) == b"READ:BLK? 0,0,0,4,8\n"
    assert P.cmd_read_cell(1, 2, 3) == b"READ:CELL? 1,2,3\n"


def test_status_and_error_replies() -> None:
    assert P.parse_status(b"OK\n") == "OK"
    with pytest.raises(P.DeviceError) as e:
        P.parse_status(P.error_reply(-222, "out of range"), "READ:BLK?")
    assert e.value.code == -222 and "out of range" in str(e.value) and "READ:BLK?" in str(e.value)


def test_settings_round_trip() -> None:
    s = P.ProgramSettings(0.3, 12, 0.4, 2.0, 30, 150, 1e-4)
    assert P.ProgramSettings.parse(s.fields()) == s


def test_command_reader_splits_stream_with_binary_blocks() -> None:
    targets = np.array([1.0, 10.0, 2.5, 0.5], np.float32)  # bytes include '\n' and '#' by chance?
    stream = (P.cmd_idn() + P.cmd_program_block("t1", P.Region(0, 0, 0, 2, 2), targets)
              + b"CLK?\n")
    chunks = [stream[i:i + 3] for i in range(0, len(stream), 3)]  # worst-case fragmentation
    it = iter(chunks)
    reader = CommandReader(lambda n: next(it, b""))
    assert reader.next() == ("*IDN?", None, None)
    header, payload, err = reader.next()
    assert header == "PROG:BLK t1,0,0,0,2,2," and err is None
    assert np.array_equal(np.frombuffer(payload, "<f4"), targets)
    assert reader.next() == ("CLK?", None, None)
    with pytest.raises(EOFError):
        reader.next()


def test_command_reader_reports_corrupt_payload() -> None:
    data = bytearray(P.cmd_program_block("t1", P.Region(0, 0, 0, 1, 2), np.array([1, 2], np.float32)))
    data[-14] ^= 0xFF  # inside the payload
    chunks = iter([bytes(data), b"*IDN?\n"])
    reader = CommandReader(lambda n: next(chunks, b""))
    _, payload, err = reader.next()
    assert payload is None and "checksum" in err
    assert reader.next()[0] == "*IDN?"  # the stream stays in sync
