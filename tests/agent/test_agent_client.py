"""The client never blocks a rank: no agent -> counted drops and a clear error; agent restart -> re-claim."""

from __future__ import annotations

import logging
import os
import time

import pytest

from envpipe_agent.client import AgentClient, default_endpoint
from envpipe_agent.embedded import start_agent
from envpipe_agent.errors import AgentError, AgentUnavailable


def test_no_agent_gives_a_clear_error_fast(short_dir: str) -> None:
    client = AgentClient(f"ipc://{short_dir}/control.sock", job_id="j", rank=0, timeout_s=0.2)
    started_s = time.monotonic()
    with pytest.raises(AgentUnavailable, match="envpipe-agent --backend sim"):
        client.hello()
    assert time.monotonic() - started_s < 1.0
    client.close()


def test_phase_without_agent_never_blocks_and_warns_once(short_dir: str, caplog) -> None:
    client = AgentClient(f"ipc://{short_dir}/control.sock", job_id="j", rank=0, timeout_s=0.2)
    with caplog.at_level(logging.WARNING, logger="envpipe_agent.client"):
        started_s = time.perf_counter()
        for i in range(1000):
            client.phase(f"F{i}", "begin", 1410)
        elapsed_s = time.perf_counter() - started_s
    assert client.events_dropped == 1000 and client.events_sent == 0
    assert elapsed_s < 0.5
    assert len([r for r in caplog.records if "dropped" in r.message]) == 1
    client.close()


def test_phase_rejects_a_bad_event_name(sim_agent) -> None:
    with AgentClient(sim_agent.endpoint, job_id="j", rank=0) as client:
        client.claim(client.hello().gpus[0].uuid)
        with pytest.raises(ValueError, match="'begin' or 'end'"):
            client.phase("F0", "start", 1410)


def test_default_endpoint_prefers_env(monkeypatch) -> None:
    monkeypatch.setenv("ENVPIPE_AGENT", "tcp://127.0.0.1:5999")
    assert default_endpoint() == "tcp://127.0.0.1:5999"
    monkeypatch.delenv("ENVPIPE_AGENT")
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert default_endpoint() == "ipc:///run/envpipe/control.sock"


def test_cuda_index_is_translated_to_a_uuid(sim_agent, monkeypatch) -> None:
    with AgentClient(sim_agent.endpoint, job_id="j", rank=0) as client:
        gpus = client.hello().gpus
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{gpus[1].uuid[:12]},0")
        assert client.gpu_uuid_for_cuda_index(0) == gpus[1].uuid
        assert client.gpu_uuid_for_cuda_index(1) == gpus[0].uuid
        with pytest.raises(AgentError, match="not among CUDA_VISIBLE_DEVICES"):
            client.gpu_uuid_for_cuda_index(2)


@pytest.mark.slow
def test_client_claims_again_when_the_agent_comes_back(short_dir: str) -> None:
    agent = start_agent(gpus=1, runtime_dir=short_dir)
    client = AgentClient(agent.endpoint, job_id="j", rank=0, timeout_s=0.5)
    try:
        uuid = client.hello().gpus[0].uuid
        first_lease = client.claim(uuid)
        assert agent.stop() == 0
        agent = start_agent(gpus=1, runtime_dir=short_dir)
        deadline_s = time.monotonic() + 5
        while client.lease_id in (0, first_lease) and time.monotonic() < deadline_s:
            time.sleep(0.05)
        assert client.lease_id not in (0, first_lease)
        holder = client.status()["gpus"][0]["holder"]
        assert holder == {"job_id": "j", "rank": 0, "pid": os.getpid(), "uid": os.getuid()}
    finally:
        client.close()
        agent.stop()
