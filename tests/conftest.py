"""Shared fixtures: a small simulated chip, and servers on real transports."""

from __future__ import annotations

import pytest

from hil.profile import ChipProfile
from hil.sim.chip import SimChip, chip_truth
from hil.sim.device import SimDevice
from hil.sim.server import SimPtyServer, SimTCPServer

SMALL = ChipProfile(tiles=2, rows=64, cols=64, block_max_cells=2048)


def make_device(seed: int = 3, profile: ChipProfile = SMALL, truth: str = "pcm-chip") -> SimDevice:
    return SimDevice(SimChip(profile, chip_truth(truth), seed=seed))


@pytest.fixture
def sim_device() -> SimDevice:
    return make_device()


@pytest.fixture
def tcp_server(sim_device: SimDevice):
    with SimTCPServer(sim_device) as srv:
        yield srv


@pytest.fixture
def pty_server(sim_device: SimDevice):
    with SimPtyServer(sim_device) as srv:
        yield srv
