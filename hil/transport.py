"""Transports: where the bytes go (resource) and how (pyvisa, pyserial, in-process).

A transport moves bytes and nothing else: `write`, `read_exact`, `read_line`, `open`, `close`.
Timeouts and broken links surface as `TransportError` so the driver can reconnect and retry.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from hil import protocol as P


class TransportError(ConnectionError):
    """The link failed (timeout, closed, I/O error); the command may or may not have executed."""


class Transport(Protocol):
    name: str

    def open(self) -> None: ...
    def close(self) -> None: ...
    def write(self, data: bytes) -> None: ...
    def read_exact(self, n: int) -> bytes: ...
    def read_line(self) -> bytes: ...


def read_reply(t: Transport) -> tuple[bytes | None, bytes | None]:
    """Read one reply: (ascii_line, None) or (None, block_payload) with its checksum verified."""
    first = t.read_exact(1)
    if first != b"#":
        return first + t.read_line(), None
    d = P.block_header_length(first + t.read_exact(1))
    n = int(t.read_exact(d))
    payload = t.read_exact(n)
    P.check_block_trailer(payload, t.read_exact(10))
    return None, payload


class _LibraryTransport:
    """Shared plumbing of transports over a third-party library handle: every library failure
    becomes a TransportError naming the transport, so the driver can reconnect and retry."""

    name: str
    _handle: Any = None

    def close(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            except Exception:  # closing a dead session must not mask the original failure
                pass
            self._handle = None

    def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        if self._handle is None:
            raise TransportError(f"{self.name} is not open")
        try:
            return fn(self._handle)
        except Exception as e:  # the libraries raise many unrelated types for a broken link
            raise TransportError(f"{self.name}: {what} failed: {e}") from e


class VisaTransport(_LibraryTransport):
    """A VISA instrument through pyvisa (pyvisa-py backend by default): TCPIP SOCKET, GPIB, USB."""

    def __init__(self, resource: str, timeout_s: float = 5.0, backend: str = "@py") -> None:
        self.resource = resource
        self.name = f"visa:{resource}"
        self.timeout_s = timeout_s
        self.backend = backend
        self._rm: Any = None

    def open(self) -> None:
        import pyvisa

        try:
            self._rm = self._rm or pyvisa.ResourceManager(self.backend)
            inst = self._rm.open_resource(self.resource, open_timeout=int(self.timeout_s * 1000))
            inst.timeout = int(self.timeout_s * 1000)
            inst.read_termination = "\n"
            inst.write_termination = ""
            inst.chunk_size = 1 << 22
            self._handle = inst
        except Exception as e:  # pyvisa raises several unrelated types for unreachable resources
            raise TransportError(f"cannot open VISA resource {self.resource!r}: {e}") from e

    def write(self, data: bytes) -> None:
        self._call("write", lambda h: h.write_raw(data))

    def read_exact(self, n: int) -> bytes:
        data = bytes(self._call(f"read of {n} bytes", lambda h: h.read_bytes(n, break_on_termchar=False)))
        if len(data) != n:
            raise TransportError(f"{self.name}: short read ({len(data)} of {n} bytes)")
        return data

    def read_line(self) -> bytes:
        return bytes(self._call("read", lambda h: h.read_bytes(1 << 16, break_on_termchar=True)))


class SerialTransport(_LibraryTransport):
    """The test board over pyserial: a UART device path, a pty, or ``socket://host:port``."""

    def __init__(self, port: str, timeout_s: float = 5.0, baudrate: int = 3_000_000) -> None:
        self.port = port
        self.name = f"serial:{port}"
        self.timeout_s = timeout_s
        self.baudrate = baudrate

    def open(self) -> None:
        import serial

        try:
            self._handle = serial.serial_for_url(self.port, baudrate=self.baudrate, timeout=self.timeout_s,
                                                 write_timeout=self.timeout_s)
        except Exception as e:
            raise TransportError(f"cannot open serial port {self.port!r}: {e}") from e

    def write(self, data: bytes) -> None:
        self._call("write", lambda h: (h.write(data), h.flush()))

    def read_exact(self, n: int) -> bytes:
        data = bytes(self._call("read", lambda h: h.read(n)))
        if len(data) != n:
            raise TransportError(f"{self.name}: timeout after {len(data)} of {n} bytes")
        return data

    def read_line(self) -> bytes:
        data = bytes(self._call("read", lambda h: h.read_until(P.TERM, 1 << 16)))
        if not data.endswith(P.TERM):
            raise TransportError(f"{self.name}: timeout waiting for end of line (got {data[:40]!r})")
        return data


class LoopbackTransport:
    """In-process link to a simulated device: the same bytes and parser, no socket (fast unit tests)."""

    def __init__(self, device) -> None:  # type: ignore[no-untyped-def]
        from hil.sim.device import CommandReader

        self.device = device
        self.name = "loopback:sim"
        self._out = bytearray()
        self._in = bytearray()
        self._reader = CommandReader(self._feed)
        self._lock = threading.Lock()
        self._open = False

    def _feed(self, n: int) -> bytes:
        data, self._in = bytes(self._in[:n]), self._in[n:]
        if not data:
            raise EOFError
        return data

    def open(self) -> None:
        self._open = True

    def close(self) -> None:
        self._open = False

    def write(self, data: bytes) -> None:
        if not self._open:
            raise TransportError("loopback transport is not open")
        self._in += data
        while True:
            try:
                header, payload, err = self._reader.next()
            except EOFError:
                return
            self._out += self.device.handle(header, payload, err)

    def read_exact(self, n: int) -> bytes:
        if len(self._out) < n:
            raise TransportError(f"loopback: no reply ({len(self._out)} of {n} bytes)")
        data = bytes(self._out[:n])
        del self._out[:n]
        return data

    def read_line(self) -> bytes:
        i = self._out.find(P.TERM)
        if i == -1:
            raise TransportError("loopback: no complete line")
        return self.read_exact(i + 1)
