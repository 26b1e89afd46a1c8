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
        ("F3", Action(K.F, 3)),
        ("B12@1410", Action(K.B, 12, clock_mhz=1410)),
        ("SA0", Action(K.SA, 0)),
        ("iSA7", Action(K.SA, 7, asynchronous=True)),
        ("wSA7", Action(K.W, 7, waits=K.SA)),
        ("iSG2", Action(K.SG, 2, asynchronous=True)),
        ("wSG2", Action(K.W, 2, waits=K.SG)),
        ("RA4", Action(K.RA, 4)),
        ("RG5", Action(K.RG, 5)),
    ],
)
def test_action_text_round_trip(text: str, action: Action) -> None:
    assert str(action) == text
    assert Action.parse(text) == action


@pytest.mark.parametrize("bad", ["", "X3", "F", "F-1", "iF3", "wF3", "RA3@1410", "SA3@", "F3 B3"])
def test_action_parse_rejects_bad_text(bad: str) -> None:
    with pytest.raises(ScheduleError):
        Action.parse(bad)


def test_action_invariants() -> None:
    with pytest.raises(ScheduleError, match="only sends"):
        Action(K.RA, 1, asynchronous=True)
    with pytest.raises(ScheduleError, match="waits"):
        Action(K.W, 1)
    with pytest.raises(ScheduleError, match=">= 0"):
        Action(K.F, -1)


def test_action_is_frozen_and_hashable() -> None:
    action = Action(K.F, 1)
    with pytest.raises(AttributeError):
        action.microbatch = 2  # type: ignore[misc]
    assert {action, Action(K.F, 1)} == {action}
    assert action.unit == "F1" and action.is_compute and not Action(K.RA, 1).is_compute


@pytest.mark.parametrize("name", ["1f1b", "ours"])
def test_render_parses_back(name: str) -> None:
    schedule = get_schedule(name, 4, 6)
    assert parse_programs(schedule.render()) == schedule.programs
    rebuilt = schedule_from_text(schedule.render(), name=name, r=schedule.r)
    assert rebuilt == schedule


def test_units_and_warmup() -> None:
    schedule = schedule_from_text("s0: F0 SA0 F1 SA1 RG0 B0 RG1 B1\ns1: RA0 F0 B0 SG0 RA1 F1 B1 SG1")
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
    assert text.splitlines()[0] == "s0: F0@1980 F1@1350 B0@1350 B1@1980"
    assert clocks_from_schedule(schedule.with_clocks(plan)) == plan


def test_parse_programs_names_the_bad_line() -> None:
    with pytest.raises(ScheduleError, match="line 2 must start with 's1:'"):
        parse_programs("s0: F0 B0\ns2: F0 B0")


def test_schedule_checks_sizes() -> None:
    with pytest.raises(ScheduleError, match="programs for 2 stages"):
        Schedule("x", 2, 1, (0, 0), ((Action(K.F, 0),),))
    with pytest.raises(ScheduleError, match="one per stage"):
        Schedule("x", 1, 1, (0, 0), ((Action(K.F, 0),),))


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
