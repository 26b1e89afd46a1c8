"""Scenario 4 at CI size: other uids, non-holders, lease theft and the allow-list."""

from __future__ import annotations

import os

import pytest
from envpipe_agent.client import AgentClient

from benchmarks.reliability import authz
from benchmarks.reliability.common import agent_test_helpers, short_dir


@pytest.mark.slow
def test_another_uid_is_refused_and_a_group_member_is_not() -> None:
    result = authz.other_uid()
    if "skipped" in result:
        pytest.skip(result["skipped"])
    assert (result["dir_mode"], result["socket_mode"]) == ("0o750", "0o660")
    assert result["other_uid"] == "refused" and result["other_uid_in_socket_group"] == "connected"


def test_non_holders_cannot_change_a_clock_or_take_the_lease() -> None:
    result = authz.non_holder_and_steal(attempts=100)
    forged, claims = result["forged_ids"], result["claims_each"]
    assert result["refused"] == {"set_clock": forged, "heartbeat": forged, "release": forged,
                                 "claim_other_job": claims, "claim_copied_holder": claims,
                                 "claim_copied_holder_forged_id": claims}
    assert result["forged_events_dropped"] == result["forged_events"]
    assert result["sets_after_attack"] == [] and result["clock_mhz_after"] == 900
    assert result["holder_kept_lease"]


def test_clocks_outside_the_allow_list_are_never_applied() -> None:
    result = authz.allow_list(requests=300)
    assert result["clocks_applied"] > 0 and result["outside_allow_list"] == 0


def test_a_claim_with_an_impossible_pid_does_not_crash_the_agent() -> None:
    with short_dir() as runtime_dir:
        agent = agent_test_helpers().ThreadAgent(runtime_dir)
        try:
            with AgentClient(agent.endpoint, job_id="x", rank=0) as client:
                uuid = client.hello().gpus[1].uuid
                client.call("claim", {"gpu_uuid": uuid, "job_id": "x", "rank": 0, "pid": 10**30})
                agent_test_helpers().wait_for(lambda: agent.agent.counters["leases_expired"] == 1)
                assert client.hello().gpus  # the loop survived the next tick
        finally:
            agent.stop()
    assert os.getpid()  # nothing left running
