"""The phases in one process: a one-rank gloo group, a fake engine (unit times follow the DVFS model) and a
fake agent client (energy = modelled busy power over the units plus idle power), the real planner."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from envpipe_agent.dvfs import get_card, get_model

from envpipe.train import phases
from envpipe.train.config import resolve
from envpipe.train.progress import MARKER
from envpipe.train.worker import RankContext

CARD = get_card("h100")
MODEL = get_model("central")


@dataclass
class _Energy:
    energy_j: float
    duration_s: float
    simulated: bool = True


class FakeEngine:
    """Runs "units" instantly but reports the times the DVFS model gives them at their planned clock."""

    def __init__(self) -> None:
        self.schedule = None
        self.clocks = None
        self.iterations = 0
        self.energy_j = 0.0
        self.schedules: list[str] = []

    def set_schedule(self, schedule) -> None:
        self.schedule = schedule
        self.schedules.append(schedule.name)

    def set_clocks(self, clocks) -> None:
        self.clocks = clocks

    def train_batch(self, data_iter=None) -> float:
        self.iterations += 1
        for span in self.last_timeline():
            x = span.clock_mhz / CARD.max_clock_mhz
            self.energy_j += (span.end_ms - span.start_ms) / 1e3 * CARD.busy_power_w * MODEL.power_ratio(x)
        return 5.0 - 0.01 * self.iterations

    def last_timeline(self):
        from envpipe.sim import UnitSpan

        spans, now_ms = [], 0.0
        for action in self.schedule.units(0):
            clock_mhz = self.clocks[0][action.unit]
            duration_ms = (1.0 if action.kind == "F" else 2.0) * MODEL.time_ratio(
                clock_mhz / CARD.max_clock_mhz
            )
            spans.append(UnitSpan(0, action.unit, now_ms, now_ms + duration_ms, clock_mhz))
            now_ms += duration_ms
        return spans

    def gather_timeline(self):
        return self.last_timeline()

    def timeline_record(self):
        return 0.0, self.last_timeline()

    def gather_timelines(self, records):
        return [spans for _, spans in records]


class FakeClient:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.windows: dict[int, float] = {}

    def window_begin(self) -> int:
        self.windows[len(self.windows)] = self.engine.energy_j
        return len(self.windows) - 1

    def window_end(self, window_id: int) -> _Energy:
        return _Energy(self.engine.energy_j - self.windows[window_id] + 0.001, 0.01)


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    from envpipe.train.launch import free_port

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    yield
    dist.destroy_process_group()


def _context(**flags) -> RankContext:
    config = resolve({"stages": 1, "micro_batches": 4, **flags})
    engine = FakeEngine()
    from envpipe.schedules import get_schedule
    from envpipe.train.worker import top_clock_plan

    engine.set_schedule(get_schedule("1f1b", 1, 4))
    engine.set_clocks(top_clock_plan(engine.schedule, CARD.max_clock_mhz))
    return RankContext(
        config=config,
        engine=engine,
        client=FakeClient(engine),
        data_iter=None,
        rank=0,
        world_size=1,
        stage=0,
        dp_index=0,
        dp_size=1,
        clocks_mhz=CARD.clocks_mhz,
        gpu_name="fake H100",
        agent_simulated=True,
    )


def _markers(capsys) -> list[dict]:
    lines = capsys.readouterr().out.splitlines()
    return [json.loads(line[len(MARKER) :]) for line in lines if line.startswith(MARKER)]


def test_uniform_run_counts_every_phase(one_rank_group, capsys):
    ctx = _context(
        type="uniform",
        scheduling="ours",
        reconfig="balanced",
        steps=6,
        baseline_steps=2,
        warmup_steps=1,
        profile_steps=2,
        profile_clocks=3,
        compare_rounds=2,
        reconfig_max_rounds=5,
    )
    result = phases.run_phases(ctx)
    names = [p["name"] for p in result["phases"]]
    assert names == ["baseline", "profiling", "reconfiguration", "steady"]
    profiling = result["phases"][1]
    # every clock twice (down the clocks, then back up), 2 iterations each time
    assert len(profiling["clocks_mhz"]) == 3 and profiling["iterations_per_clock"] == 4
    # f_low is the modelled energy valley of the profiled clocks (idle power is not charged by this fake).
    energy = {c: MODEL.energy_ratio(c / CARD.max_clock_mhz) for c in profiling["clocks_mhz"]}
    assert result["profile"]["stages"][0]["f_low_mhz"] == min(energy, key=energy.get)
    steady = result["phases"][3]
    assert steady["compare_rounds"] == 2 and len(steady["windows"]) == 2
    assert len(steady["baseline_windows"]) == 2  # one per round, next to that round's final window
    # one stage has no slack: the bound brings the plan back to (about) the top clocks, saving ~0
    assert len(steady["paired_savings"]) == 2 and all(-1e-9 <= x < 0.5 for x in steady["paired_savings"])
    reconfiguration = result["phases"][2]
    assert 1 <= reconfiguration["rounds"] <= 5 + 1
    # warm-up 1 + baseline 2 + profiling 3 clocks x 2 passes x (1 settling + 2) + reconfiguration
    # (a fresh baseline first: settle + samples + settle, then samples per round) + steady 6 steps on
    # each side + 1 settling iteration per window (2 x 2)
    samples = phases.RECONFIG_SAMPLES
    expected = 1 + 2 + 18 + (samples + 2) + samples * reconfiguration["rounds"] + 2 * 6 + 4
    assert ctx.engine.iterations == expected
    events = _markers(capsys)
    assert [e["phase"] for e in events if e["event"] == "phase"] == names
    assert any(e["event"] == "message" and "profiling" in e["text"] for e in events)
    # The steady phase switched between the baseline's 1F1B and the final plan, ending on the final plan.
    assert ctx.engine.schedules[-1] == result["schedule"]["name"] == "ours"


def test_baseline_type_skips_profiling(one_rank_group):
    ctx = _context(
        type="baseline", scheduling="1f1b", steps=3, baseline_steps=2, warmup_steps=1, compare_rounds=2
    )
    result = phases.run_phases(ctx)
    assert [p["name"] for p in result["phases"]] == ["baseline", "steady"]
    assert result["phases"][1]["compare_rounds"] == 2 and result["profile"] is None
    assert ctx.engine.iterations == 1 + 2 + 2 * 3 + 4  # steady: 3 steps per side, 1 settling per window
    assert set(result["clocks"]["0"].values()) == {CARD.max_clock_mhz}


def test_profile_mode_returns_only_the_profile(one_rank_group):
    ctx = _context(mode="profile", profile_clocks=2, profile_steps=1, warmup_steps=1)
    result = phases.run_phases(ctx)
    assert set(result) == {"profile"} and len(result["profile"]["stages"][0]["points"]) == 2


class _StoppingEngine(FakeEngine):
    """A FakeEngine that sends ``sig`` to the agent once ``after`` iterations have run."""

    def __init__(self, agent_pid: int, sig: int, after: int) -> None:
        super().__init__()
        self.agent_pid, self.sig, self.after = agent_pid, sig, after

    def train_batch(self, data_iter=None) -> float:
        loss = super().train_batch(data_iter)
        if self.iterations == self.after:
            import os

            os.kill(self.agent_pid, self.sig)
        return loss


@pytest.fixture
def real_agent():
    from envpipe_agent.embedded import start_agent

    agent = start_agent(backend="sim", gpus=1)
    yield agent
    import os
    import signal

    try:
        os.kill(agent.pid, signal.SIGCONT)  # a stopped agent cannot act on SIGTERM
    except ProcessLookupError:
        pass
    agent.stop()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGSTOP", "SIGKILL"])
def test_agent_stopped_or_killed_mid_run_training_goes_on(one_rank_group, real_agent, capsys, how):
    import signal

    from envpipe_agent.client import AgentClient
    from rich.console import Console

    from envpipe.train.report import build_report, print_summary

    client = AgentClient(real_agent.endpoint, job_id="phases-test", rank=0, timeout_s=0.3)
    try:
        gpu = client.hello().gpus[0]
        client.claim(gpu.uuid)
        ctx = _context(
            type="envelope",
            scheduling="ours",
            reconfig="default",
            steps=4,
            baseline_steps=2,
            warmup_steps=1,
            profile_steps=1,
            profile_clocks=2,
            compare_rounds=2,
        )
        # Dies in the second profiling window (warm-up 1, baseline 2, then 1980, 990, 990, 1980 MHz, each
        # 1 settling + 1 measured): 990 MHz and the steady phase have no energy, 1980 MHz has its first.
        engine = _StoppingEngine(real_agent.pid, getattr(signal, how), after=1 + 2 + 2 + 2)
        engine.set_schedule(ctx.engine.schedule)
        engine.set_clocks(ctx.engine.clocks)
        ctx.engine, ctx.client = engine, client
        result = phases.run_phases(ctx)
    finally:
        client.close()
    assert [p["name"] for p in result["phases"]] == ["baseline", "profiling", "reconfiguration", "steady"]
    points = result["profile"]["stages"][0]["points"]
    assert [p["clock_mhz"] for p in points] == [CARD.max_clock_mhz]  # the window measured before it died
    assert result["phases"][0]["energy_j"] > 0
    steady = result["phases"][-1]
    assert steady["energy_j"] is None and all(w["energy_j"] is None for w in steady["windows"])
    assert result["energy_unavailable_windows"] == 7  # 3 profiling + 2 rounds x (baseline + final)
    config = resolve({"stages": 1, "micro_batches": 4})
    report = build_report(config, {**result, "agent": None})
    summary = report["summary"]
    assert summary["energy_saving"] is None and summary["steady"]["energy_j_per_iteration"] is None
    assert summary["energy_unavailable_windows"] == 7
    console = Console(record=True, width=200)
    print_summary(report, console)
    text = console.export_text()
    assert "unavailable" in text and "energy unavailable for 7 measurement window(s)" in text
    warnings = [e for e in _markers(capsys) if e["event"] == "message" and "warning" in e["text"]]
    assert len(warnings) == 1 and "energy unavailable" in warnings[0]["text"]
