"""IR: actions print and parse back exactly; programs render one line per stage and parse back."""

from __future__ import annotations

import pytest

from envpipe.errors import ScheduleError
from envpipe.ir import Action, ActionKind, Schedule, clocks_from_schedule, parse_programs, schedule_from_text
from envpipe.schedules import get_schedule

K = ActionKind


@pytest.mark.parametrize(
    ("text", "action"),
    [
        ("0F3", Action(0, K.F, 3)),
        ("2B12@1410", Action(2, K.B, 12, clock_mhz=1410)),
        ("1I4", Action(1, K.I, 4)),
        ("1W4@990", Action(1, K.W, 4, clock_mhz=990)),
        ("0SA0", Action(0, K.SA, 0)),
        ("0iSA7", Action(0, K.SA, 7, asynchronous=True)),
        ("0wSA7", Action(0, K.WAIT, 7, waits=K.SA)),
        ("3iSG2", Action(3, K.SG, 2, asynchronous=True)),
        ("3wSG2", Action(3, K.WAIT, 2, waits=K.SG)),
        ("1RA4", Action(1, K.RA, 4)),
        ("12RG5", Action(12, K.RG, 5)),
    ],
)
def test_action_text_round_trip(text: str, action: Action) -> None:
    assert str(action) == text
    assert Action.parse(text) == action


@pytest.mark.parametrize(
    "bad",
    ["", "X3", "0F", "0F-1", "F3", "0iF3", "0wF3", "0iW3", "0RA3@1410", "0wSA3@1410", "0SA3@", "0F3 0B3",
     "0WAIT3", "-1F3"],
)
def test_action_parse_rejects_bad_text(bad: str) -> None:
    with pytest.raises(ScheduleError):
        Action.parse(bad)


def test_action_invariants() -> None:
    with pytest.raises(ScheduleError, match="only sends"):
        Action(0, K.RA, 1, asynchronous=True)
    with pytest.raises(ScheduleError, match="waits"):
        Action(0, K.WAIT, 1)
    with pytest.raises(ScheduleError, match="waits"):
        Action(0, K.W, 1, waits=K.SA)  # W is the weight gradient, not a wait
    with pytest.raises(ScheduleError, match="micro-batch index must be >= 0"):
        Action(0, K.F, -1)
    with pytest.raises(ScheduleError, match="stage index must be >= 0"):
        Action(-1, K.F, 0)


def test_kinds_name_the_field_and_wait_is_its_own_kind() -> None:
    assert [k.value for k in (K.F, K.I, K.W, K.B)] == ["F", "I", "W", "B"]
    assert all(Action(0, k, 0).is_compute for k in (K.F, K.I, K.W, K.B))
    assert not Action(0, K.WAIT, 0, waits=K.SG).is_compute
    assert Action(0, K.WAIT, 0, waits=K.SG).label == "wSG0" and Action(5, K.SA, 1, True).label == "iSA1"


def test_action_is_frozen_and_hashable() -> None:
    action = Action(0, K.F, 1)
    with pytest.raises(AttributeError):
        action.microbatch = 2  # type: ignore[misc]
    assert {action, Action(0, K.F, 1)} == {action} and action != Action(1, K.F, 1)
    assert action.unit == "F1" and action.is_compute and not Action(0, K.RA, 1).is_compute


@pytest.mark.parametrize("name", ["1f1b", "ours"])
def test_render_parses_back(name: str) -> None:
    schedule = get_schedule(name, 4, 6)
    assert parse_programs(schedule.render()) == schedule.programs
    rebuilt = schedule_from_text(schedule.render(), name=name, r=schedule.r)
    assert rebuilt == schedule


def test_units_and_warmup() -> None:
    schedule = schedule_from_text("r0: 0F0 0SA0 0F1 0SA1 0RG0 0B0 0RG1 0B1\nr1: 1RA0 1F0 1B0 1SG0 1RA1 1F1 1B1 1SG1")
    assert [u.unit for u in schedule.units(0)] == ["F0", "F1", "B0", "B1"]
    assert schedule.warmup(0) == 2 and schedule.warmup(1) == 1
    assert schedule.micro_batches == 2 and schedule.stages == 2


def test_clocks_render_and_round_trip() -> None:
    schedule = get_schedule("1f1b", 2, 2)
    plan = {
        0: {"F0": 1980, "F1": 1350, "B0": 1350, "B1": 1980},
        1: {"F0": 1980, "F1": 1980, "B0": 1980, "B1": 1980},
    }
    text = schedule.render(plan, compute_only=True)
    assert text.splitlines()[0] == "r0: 0F0@1980 0F1@1350 0B0@1350 0B1@1980"
    assert clocks_from_schedule(schedule.with_clocks(plan)) == plan


def test_parse_programs_names_the_bad_line() -> None:
    with pytest.raises(ScheduleError, match="line 2 must start with 'r1:'"):
        parse_programs("r0: 0F0 0B0\nr2: 2F0 2B0")


def test_schedule_checks_sizes() -> None:
    with pytest.raises(ScheduleError, match="programs for 2 stages"):
        Schedule("x", 2, 1, (0, 0), ((Action(0, K.F, 0),),))
    with pytest.raises(ScheduleError, match="one per stage"):
        Schedule("x", 1, 1, (0, 0), ((Action(0, K.F, 0),),))
    with pytest.raises(ScheduleError, match="out of range"):
        Schedule("x", 1, 1, (0,), ((Action(0, K.F, 0), Action(1, K.F, 0)),))
    with pytest.raises(ScheduleError, match="stage 1 appears on rank 0 and on rank 1"):
        schedule_from_text("r0: 0F0 1F0\nr1: 1B0")


def test_a_rank_may_hold_several_stages() -> None:
    schedule = schedule_from_text("r0: 0F0 0SA0 2RA0 2F0 2B0 2SG0 0RG0 0B0\nr1: 1RA0 1F0 1SA0 1RG0 1B0 1SG0")
    assert schedule.stages == 3 and schedule.ranks == 2 and schedule.stage_rank == (0, 1, 0)
    assert schedule.rank_stages(0) == (0, 2) and not schedule.one_stage_per_rank
    assert [str(u) for u in schedule.units(0)] == ["0F0", "2F0", "2B0", "0B0"]
    with pytest.raises(ScheduleError, match="needs one stage per rank"):
        schedule.require_one_stage_per_rank("the planner")
    assert get_schedule("ours", 3, 4).one_stage_per_rank


def test_schedule_core_imports_nothing_heavy() -> None:
    """The IR, generators, verifier, simulator and simulate CLI import no torch, deepspeed or matplotlib."""
    import subprocess
    import sys

    code = (
        "import sys, envpipe.ir, envpipe.schedules, envpipe.verify, envpipe.sim, envpipe.clock_types, "
        "envpipe.render, envpipe_cli.simulate; "
        "print(sorted(m for m in ('torch', 'deepspeed', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
