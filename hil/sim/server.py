"""Servers that put a `SimDevice` on a real transport: TCP socket (VISA SOCKET / pyserial
``socket://``) and a pseudo-terminal (pyserial on a tty), with fault injection for tests."""

from __future__ import annotations

import os
import socket
import socketserver
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass, field

from hil.sim.device import CommandReader, SimDevice


@dataclass
class FaultPlan:
    """Faults fired once each, counted over all connections (so a reconnect gets a clean line).

    ``drop_at``: close the connection on receiving the Nth command (1-based), before executing it.
    ``drop_after_exec_at``: execute the Nth command, then close without replying (the reply is lost).
    ``delay_at``/``delay_s``: sleep before replying to the Nth command (past the client's timeout).
    ``corrupt_at``: flip one byte of the Nth reply.
    """

    drop_at: set[int] = field(default_factory=set)
    drop_after_exec_at: set[int] = field(default_factory=set)
    delay_at: set[int] = field(default_factory=set)
    delay_s: float = 0.0
    corrupt_at: set[int] = field(default_factory=set)
    count: int = 0
    fired: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_index(self) -> int:
        with self.lock:
            self.count += 1
            return self.count


class _Session:
    """Serves one byte stream until it closes; returns False if a fault dropped it."""

    def __init__(self, device: SimDevice, faults: Callable[[], FaultPlan | None]) -> None:
        self.device = device
        self.get_faults = faults  # looked up per command, so a plan can be installed mid-session

    def serve(self, recv, send) -> None:  # type: ignore[no-untyped-def]
        reader = CommandReader(recv)
        while True:
            try:
                header, payload, err = reader.next()
            except (EOFError, OSError):
                return
            if not header and payload is None and err is None:
                continue
            f = self.get_faults()
            i = f.next_index() if f else 0
            if f and i in f.drop_at:
                f.fired.append(f"drop@{i}")
                return
            reply = self.device.handle(header, payload, err)
            if f and i in f.drop_after_exec_at:
                f.fired.append(f"drop_after_exec@{i}")
                return
            if f and i in f.delay_at:
                f.fired.append(f"delay@{i}")
                time.sleep(f.delay_s)
            if f and i in f.corrupt_at and len(reply) > 12:
                f.fired.append(f"corrupt@{i}")
                b = bytearray(reply)
                b[len(b) // 2] ^= 0xFF
                reply = bytes(b)
            try:
                send(reply)
            except OSError:
                return


class _Handler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _Session(self.server.device, lambda: self.server.faults).serve(sock.recv, sock.sendall)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    device: SimDevice
    faults: FaultPlan | None


class SimTCPServer:
    """The simulated chip on a TCP port (127.0.0.1 unless told otherwise), served from a thread."""

    def __init__(self, device: SimDevice, host: str = "127.0.0.1", port: int = 0,
                 faults: FaultPlan | None = None) -> None:
        self._srv = _TCPServer((host, port), _Handler)
        self._srv.device = device
        self._srv.faults = faults
        self.device = device
        self.host, self.port = self._srv.server_address[:2]
        self._thread: threading.Thread | None = None

    @property
    def faults(self) -> FaultPlan | None:
        return self._srv.faults

    @faults.setter
    def faults(self, plan: FaultPlan | None) -> None:
        self._srv.faults = plan

    @property
    def visa_resource(self) -> str:
        return f"TCPIP::{self.host}::{self.port}::SOCKET"

    @property
    def serial_url(self) -> str:
        return f"socket://{self.host}:{self.port}"

    def start(self) -> SimTCPServer:
        self._thread = threading.Thread(target=self._srv.serve_forever, name="sim-tcp", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._srv.serve_forever()

    def stop(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()

    def __enter__(self) -> SimTCPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SimPtyServer:
    """The simulated chip behind a pseudo-terminal, for tools that want a tty (like a UART board)."""

    def __init__(self, device: SimDevice, faults: FaultPlan | None = None) -> None:
        self.device = device
        self.faults = faults
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        tty.setraw(self._master)
        self.path = os.ttyname(self._slave)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _recv(self, n: int) -> bytes:
        import select

        while not self._stop.is_set():
            r, _, _ = select.select([self._master], [], [], 0.05)
            if r:
                try:
                    return os.read(self._master, n)
                except OSError:
                    return b""
        return b""

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            k = os.write(self._master, view)
            view = view[k:]

    def _run(self) -> None:
        while not self._stop.is_set():  # a dropped "connection" on a tty: the session restarts
            _Session(self.device, lambda: self.faults).serve(self._recv, self._send)

    def start(self) -> SimPtyServer:
        self._thread = threading.Thread(target=self._run, name="sim-pty", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)
        for fd in (self._master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> SimPtyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
