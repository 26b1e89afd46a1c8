"""Prometheus metrics in base units, an info metric, the lease and the apply-latency histogram (issue 15)."""

from __future__ import annotations

import os
import re

from prometheus_client import CollectorRegistry, generate_latest

from envpipe_agent import __version__
from envpipe_agent.client import AgentClient
from envpipe_agent.metrics import AgentCollector
from tests.agent.conftest import ThreadAgent, wait_for


def _scrape(agent: ThreadAgent) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent.agent))
    return generate_latest(registry).decode()


def test_metrics_use_base_units_and_label_the_holder(sim_agent: ThreadAgent) -> None:
    with AgentClient(sim_agent.endpoint, job_id="job-7", rank=3) as client:
        client.claim(client.hello().gpus[1].uuid)
        client.set_clock(1410)
        wait_for(lambda: sim_agent.agent.status()["gpus"][1]["clock_changes"] == 1)
        body = _scrape(sim_agent)
    assert f'envpipe_agent_info{{backend="sim",read_only="false",version="{__version__}"}} 1.0' in body
    assert re.search(r'envpipe_gpu_target_clock_hertz\{gpu="1",[^}]*\} 1\.41e\+09', body)
    assert 'envpipe_gpu_power_watts{gpu="0"' in body and "envpipe_gpu_energy_joules_total{" in body
    assert f'envpipe_gpu_lease{{gpu="1",job="job-7",rank="3",simulated="true",uid="{os.getuid()}"' in body
    assert 'envpipe_gpu_apply_latency_seconds_count{gpu="1"' in body and 'le="+Inf"' in body
    count = re.search(r'envpipe_gpu_apply_latency_seconds_count\{gpu="1"[^}]*\} (\S+)', body)
    assert count is not None and float(count.group(1)) == 1.0
    assert "_mhz" not in body and "_ms" not in body.replace("_ms_", "")  # no non-base units left
    assert "envpipe_agent_events_received_total" in body
