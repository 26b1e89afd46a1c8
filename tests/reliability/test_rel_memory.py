"""Long-running agents keep bounded state: the sim backend's call log (fix 4 of docs/reliability.md)."""

from __future__ import annotations

from envpipe_agent.sim import SimBackend


def test_sim_call_log_is_bounded() -> None:
    backend = SimBackend(gpus=1)
    clocks = backend.card.clocks_mhz
    for i in range(50_000):  # a few seconds of a 64-rank load
        backend.set_locked_clock(0, clocks[i % len(clocks)])
    assert len(backend.calls) <= 10_000
    assert backend.calls[-1] == ("set", 0, clocks[49_999 % len(clocks)])  # the latest are kept
