"""Resolve a --device string to a connected ChipDriver (resource: where; driver: how).

``sim`` starts a simulated chip in-process behind a real loopback TCP socket and talks to it
through pyvisa, so the default path exercises the same driver code as hardware.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from hil.driver import ChipDriver, DeviceStringError, transport_for
from hil.profile import ChipProfile
from hil.sim.chip import SimChip, chip_truth
from hil.sim.device import SimDevice
from hil.sim.server import SimTCPServer
from hil.transport import VisaTransport


@dataclass(frozen=True)
class SimOptions:
    """The simulated chip started by ``--device sim``."""

    truth: str = "pcm-chip"
    seed: int = 0
    profile: ChipProfile = field(default_factory=ChipProfile)


@contextmanager
def connect(device: str, timeout_s: float = 5.0, sim: SimOptions | None = None,
            state_path: Path | None = None) -> Iterator[ChipDriver]:
    """Yield a connected driver. The in-process simulated chip keeps its non-volatile state in
    ``state_path`` (if given), so a killed run can resume against the same chip contents."""
    if device == "sim":
        sim = sim or SimOptions()
        truth = chip_truth(sim.truth)
        profile = sim.profile
        if abs(truth.g_max - profile.g_max) > 1e-9:
            profile = replace(profile, g_max=truth.g_max)
        dev = SimDevice(SimChip(profile, truth, seed=sim.seed), state_path=state_path)
        with SimTCPServer(dev) as srv, ChipDriver(VisaTransport(srv.visa_resource, timeout_s=timeout_s)) as drv:
            yield drv
        return
    if device.startswith("sim:"):
        host, _, port = device[4:].rpartition(":")
        if not port.isdigit():
            raise DeviceStringError(f"device {device!r}: expected sim:HOST:PORT, e.g. sim:127.0.0.1:5025")
        drv = ChipDriver(VisaTransport(f"TCPIP::{host or '127.0.0.1'}::{port}::SOCKET", timeout_s=timeout_s))
    else:
        drv = ChipDriver(transport_for(device, timeout_s=timeout_s))
    with drv:
        yield drv
