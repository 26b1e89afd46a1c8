"""Issue 7, deliverable 1: the agent's status snapshot says how many SM clocks the card supports."""

from __future__ import annotations

from envpipe_agent.config import resolve_config
from envpipe_agent.server import Agent
from envpipe_agent.sim import SimBackend


def test_status_counts_the_supported_clocks_and_keeps_the_list_in_hello(tmp_path):
    config = resolve_config("", {"backend": "sim", "gpus": 2, "runtime_dir": str(tmp_path)})
    agent = Agent(config, SimBackend(gpus=2))
    gpus = agent.status()["gpus"]
    # The simulated H100 has the lent H100's clock set: 1980 down to 345 MHz in 15 MHz steps.
    assert [gpu["supported_clocks"] for gpu in gpus] == [110, 110]
    assert all("clocks_mhz" not in gpu for gpu in gpus)  # the list itself stays in the hello reply
    assert len(agent.op_hello({})["gpus"][0]["clocks_mhz"]) == 110
