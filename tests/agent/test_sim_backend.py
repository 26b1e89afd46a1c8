"""The sim backend's energy is the documented model, integrated exactly (clock controlled by the test)."""

from __future__ import annotations

import pytest

import envpipe_agent.sim as sim_module
from envpipe_agent.dvfs import get_card, get_model
from envpipe_agent.sim import SimBackend, sim_uuid


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(sim_module.time, "monotonic", fake)
    return fake


def test_busy_at_a_locked_clock_and_idle(clock: FakeClock) -> None:
    backend = SimBackend(gpus=1, card="h100", model="central")
    card, model = get_card("h100"), get_model("central")
    backend.set_locked_clock(0, 1380)
    backend.on_phase(0, busy=True)
    clock.now_s += 2.0  # 2 s busy at 1380 MHz
    backend.on_phase(0, busy=False)
    clock.now_s += 3.0  # 3 s idle
    # Idle: the model's share of busy power (0.18 x 700 W), 25 % lower at the bottom clock.
    idle_w = model.idle_fraction * card.busy_power_w * (1 - 0.25 * (1980 - 1380) / (1980 - 345))
    expected_j = 2.0 * card.busy_power_w * model.power_ratio(1380 / 1980) + 3.0 * idle_w
    assert backend.read_energy_mj(0) == pytest.approx(expected_j * 1000, abs=1)
    assert backend.read_power_w(0) == pytest.approx(idle_w)


@pytest.mark.parametrize("clock_mhz", [1980, 1380, 990, 345])
def test_idle_power_follows_the_simulators_rule(clock: FakeClock, clock_mhz: int) -> None:
    # One power model on both sides: the sim agent and envpipe.sim's cost model give the same idle power.
    from envpipe.sim.costs import CostModel

    card = get_card("h100")
    backend = SimBackend(gpus=1, card="h100")
    backend.set_locked_clock(0, clock_mhz)
    costs = CostModel((10.0,), (20.0,), card, get_model("central"))
    assert backend.read_power_w(0) == pytest.approx(costs.idle_power_w(0, clock_mhz), rel=1e-12)
    assert card.idle_power_ratio(345) == pytest.approx(0.75) and card.idle_power_ratio(1980) == 1.0


def test_reset_returns_to_the_top_clock_and_duplicates_do_not_integrate_twice(clock: FakeClock) -> None:
    backend = SimBackend(gpus=2, card="a100")
    backend.set_locked_clock(1, 750)
    backend.reset_clocks(1)
    assert backend.read_clock_mhz(1) == 1410 and not backend.is_locked(1)
    backend.on_phase(1, busy=True)
    backend.on_phase(1, busy=True)  # a repeated begin changes nothing
    clock.now_s += 1.0
    assert backend.read_energy_mj(1) == 400_000  # 1 s at the A100's 400 W, top clock


def test_unsupported_clock_is_refused_and_uuids_are_stable() -> None:
    backend = SimBackend(gpus=2)
    with pytest.raises(ValueError, match="not a supported clock"):
        backend.set_locked_clock(0, 1412)
    assert [gpu.uuid for gpu in backend.gpus()] == [sim_uuid(0), sim_uuid(1)]
    assert "(simulated)" in backend.gpus()[0].name
    with pytest.raises(ValueError, match="at least one GPU"):
        SimBackend(gpus=0)
