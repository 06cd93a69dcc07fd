"""The driver over real transports: pyvisa-py TCPIP SOCKET, pyserial socket:// and a pty."""

from __future__ import annotations

import numpy as np
import pytest

from hil import protocol as P
from hil.driver import ChipDriver, DeviceStringError, RetryPolicy, transport_for
from hil.profile import SafetyError
from hil.sim.server import FaultPlan
from hil.transport import LoopbackTransport, SerialTransport, TransportError, VisaTransport

REGION = P.Region(1, 8, 0, 32, 64)


def _transports(kind: str, tcp_server, pty_server, sim_device):
    return {
        "visa-tcp": lambda: VisaTransport(tcp_server.visa_resource, timeout_s=2.0),
        "serial-socket": lambda: SerialTransport(tcp_server.serial_url, timeout_s=2.0),
        "serial-pty": lambda: SerialTransport(pty_server.path, timeout_s=2.0),
        "loopback": lambda: LoopbackTransport(sim_device),
    }[kind]()


@pytest.mark.parametrize("kind", ["visa-tcp", "serial-socket", "serial-pty", "loopback"])
def test_identity_program_read_over_transport(kind, tcp_server, pty_server, sim_device) -> None:
    with ChipDriver(_transports(kind, tcp_server, pty_server, sim_device)) as drv:
        assert drv.idn().startswith("ROMER-HIL,SIMCHIP-PCM")
        prof = drv.profile()
        assert (prof.tiles, prof.rows, prof.cols) == (2, 64, 64)
        drv.configure_programming(P.ProgramSettings())
        targets = np.linspace(0, 25, REGION.size, dtype=np.float32)
        pulses, verified = drv.program_block(REGION, targets, txn=f"{kind}-1")
        assert pulses.shape == (REGION.size,) and verified.mean() > 0.95
        drv.wait_until(drv.clock() + 1.0)
        g = drv.read_block(REGION)
        healthy = sim_device.chip.stuck[1, 8:40, :64].reshape(-1) == 0
        assert np.corrcoef(g[healthy], targets[healthy])[0, 1] > 0.97  # programming + read noise
        one = drv.read_cell(1, 8, 5)
        assert one == drv.read_cell(1, 8, 5)  # same instant, same cell: same value (keyed on the clock)
        assert one == pytest.approx(float(g[5]), abs=1.0)
        assert drv.errors() == []
        truth = drv.truth()
        assert truth is not None and truth.name == sim_device.chip.truth.name


def test_program_retry_is_idempotent(sim_device) -> None:
    with ChipDriver(LoopbackTransport(sim_device)) as drv:
        drv.configure_programming(P.ProgramSettings())
        a = drv.program_block(REGION, np.full(REGION.size, 5.0, np.float32), txn="x1")
        clock = drv.clock()
        b = drv.program_block(REGION, np.full(REGION.size, 5.0, np.float32), txn="x1")
        assert drv.clock() == clock  # no pulses were applied the second time
        assert np.array_equal(a[0], b[0])


def test_unsafe_settings_refused_by_driver_before_sending(sim_device) -> None:
    sent: list[bytes] = []
    tr = LoopbackTransport(sim_device)
    orig = tr.write
    tr.write = lambda data: (sent.append(data), orig(data))[1]  # type: ignore[method-assign]
    with ChipDriver(tr) as drv:
        drv.profile()
        n = len(sent)
        with pytest.raises(SafetyError, match="v_max=5.0 V exceeds"):
            drv.configure_programming(P.ProgramSettings(v_max=5.0))
        with pytest.raises(SafetyError, match="compliance"):
            drv.configure_programming(P.ProgramSettings(i_compliance_a=1.0))
        with pytest.raises(SafetyError, match="within the chip range"):
            drv.program_block(REGION, np.full(REGION.size, 99.0), txn="bad")
        with pytest.raises(ValueError, match="outside the chip"):
            drv.read_block(P.Region(5, 0, 0, 1, 1))
        assert len(sent) == n  # nothing reached the device


def test_unsafe_settings_refused_by_device_too(tcp_server) -> None:
    with ChipDriver(VisaTransport(tcp_server.visa_resource)) as drv:
        with pytest.raises(P.DeviceError) as e:
            drv.ask("PROG:CONF 0.2,20,0.5,9.0,20,200,0.0002")  # bypasses the driver's check
        assert e.value.code == P.E_SAFETY and "exceeds" in e.value.message
        assert drv.errors()[0][0] == P.E_SAFETY


def test_unknown_command_and_bad_region_are_device_errors(tcp_server) -> None:
    with ChipDriver(SerialTransport(tcp_server.serial_url)) as drv:
        with pytest.raises(P.DeviceError, match="unknown command"):
            drv.ask("FOO:BAR?")
        with pytest.raises(P.DeviceError, match="outside the array"):
            drv.ask_block(P.cmd("READ:BLK? 0,60,0,10,10"), "READ:BLK?")


@pytest.mark.parametrize("fault", ["drop", "drop_after_exec", "corrupt", "delay"])
def test_driver_recovers_from_link_faults(fault, tcp_server) -> None:
    with ChipDriver(VisaTransport(tcp_server.visa_resource, timeout_s=0.5)) as drv:
        drv.configure_programming(P.ProgramSettings())
        drv.program_block(REGION, np.full(REGION.size, 9.0, np.float32), txn="f0")
        drv.wait_until(drv.clock() + 5)
        clean = drv.read_block(REGION)
        plan = FaultPlan(delay_s=1.2)
        getattr(plan, f"{fault}_at").add(plan.count + 1)  # the very next command
        tcp_server.faults = plan
        again = drv.read_block(REGION)
        assert plan.fired and drv.retries >= 1
        assert np.array_equal(clean, again)


def test_driver_gives_up_after_bounded_retries(tcp_server) -> None:
    plan = FaultPlan(drop_at={1, 2, 3, 4, 5})
    tcp_server.faults = plan
    drv = ChipDriver(VisaTransport(tcp_server.visa_resource, timeout_s=0.5), retry=RetryPolicy(attempts=3, backoff_s=0))
    with drv, pytest.raises(TransportError, match="failed after 3 attempts"):
        drv.idn()


def test_unreachable_and_malformed_devices() -> None:
    with pytest.raises(DeviceStringError, match="not understood"):
        transport_for("gpib0")
    with pytest.raises(TransportError, match="cannot open"):
        SerialTransport("/dev/does-not-exist").open()
