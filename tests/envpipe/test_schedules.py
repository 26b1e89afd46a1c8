"""Generators: 1f1b equals DeepSpeed's TrainSchedule order; ours follows EnvPipe's step formula for any r."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from envpipe.errors import ConfigError, ScheduleError
from envpipe.ir import Action, ActionKind
from envpipe.schedules import compute_r, get_schedule
from envpipe.schedules.ours import r_from_times, unit_order, warmups
from envpipe.sim import CostModel

K = ActionKind
GOLDEN = Path(__file__).parent / "golden"

# DeepSpeed instruction class name -> our action kind (loads, reductions and the optimizer step are not p2p).
_DS_KINDS = {
    "ForwardPass": K.F,
    "BackwardPass": K.B,
    "SendActivation": K.SA,
    "RecvActivation": K.RA,
    "SendGrad": K.SG,
    "RecvGrad": K.RG,
}


def _deepspeed_program(stages: int, micro_batches: int, stage: int) -> list[Action]:
    """DeepSpeed's per-stage order; the k-th instruction of a kind is micro-batch k (checked by buffer)."""
    from deepspeed.runtime.pipe.schedule import TrainSchedule

    ds = TrainSchedule(micro_batches=micro_batches, stages=stages, stage_id=stage)
    counts: dict[ActionKind, int] = dict.fromkeys(_DS_KINDS.values(), 0)
    program = []
    for step in ds.steps():
        for cmd in step:
            kind = _DS_KINDS.get(type(cmd).__name__)
            if kind is None:
                continue
            mb = counts[kind]
            counts[kind] += 1
            assert cmd.buffer_id == mb % ds.num_pipe_buffers(), (stage, cmd, mb)
            program.append(Action(stage, kind, mb))
    return program


def test_1f1b_matches_deepspeed_train_schedule() -> None:
    pytest.importorskip("deepspeed.runtime.pipe.schedule")
    for stages in range(1, 9):
        for micro_batches in range(1, 33):
            ours = get_schedule("1f1b", stages, micro_batches)
            for stage in range(stages):
                assert list(ours.programs[stage]) == _deepspeed_program(stages, micro_batches, stage), (
                    f"S={stages} M={micro_batches} stage {stage}"
                )


@pytest.mark.parametrize(("stages", "micro_batches"), [(1, 1), (2, 5), (4, 4), (4, 16), (8, 3)])
def test_1f1b_unit_order_follows_step_formula(stages: int, micro_batches: int) -> None:
    schedule = get_schedule("1f1b", stages, micro_batches)
    for stage in range(stages):
        steps = {f"F{m}": 2 * m + stage for m in range(micro_batches)}
        steps |= {f"B{m}": 2 * (m + stages) - stage - 1 for m in range(micro_batches)}
        units = [u.unit for u in schedule.units(stage)]
        assert units == sorted(units, key=steps.__getitem__)
        assert schedule.warmup(stage) == min(micro_batches, stages - stage)


@pytest.mark.parametrize("r", [(0, 0, 0, 0), (4, 3, 1, 0), (4, 5, 2, 0), (1, 2, 1, 0), (9, 9, 9, 0)])
def test_ours_unit_order_follows_step_formula(r: tuple[int, ...]) -> None:
    stages, micro_batches = 4, 8
    schedule = get_schedule("ours", stages, micro_batches, r)
    for stage in range(stages):
        steps = {f"F{m}": 2 * m + stage for m in range(micro_batches)}
        steps |= {f"B{m}": 2 * (m + stages + r[stage]) - stage - 1 for m in range(micro_batches)}
        units = [u.unit for u in schedule.units(stage)]
        assert units == sorted(units, key=steps.__getitem__)
        assert schedule.warmup(stage) == min(micro_batches, stages - stage + r[stage])


def test_ours_sends_are_async_and_receives_sit_right_before_their_unit() -> None:
    schedule = get_schedule("ours", 4, 8, (4, 3, 1, 0))
    for stage, program in enumerate(schedule.programs):
        for i, action in enumerate(program):
            if action.kind in (K.SA, K.SG):
                assert action.asynchronous
                assert program[i - 1].is_compute and program[i - 1].microbatch == action.microbatch
            if action.kind in (K.RA, K.RG):
                unit = next(a for a in program[i + 1 :] if a.is_compute)
                assert unit.microbatch == action.microbatch, (stage, i)


def test_ours_rejects_cyclic_r() -> None:
    with pytest.raises(ScheduleError, match=r"lower r\[2\] to at most 1"):
        get_schedule("ours", 4, 8, (0, 0, 3, 0))
    with pytest.raises(ScheduleError, match="last stage must be 0"):
        get_schedule("ours", 2, 4, (0, 1))
    with pytest.raises(ScheduleError, match="one per stage"):
        get_schedule("ours", 3, 4, (1, 0))
    with pytest.raises(ScheduleError, match=">= 0"):
        get_schedule("ours", 2, 4, (-1, 0))


def test_get_schedule_input_errors() -> None:
    with pytest.raises(ConfigError, match="unknown schedule 'gpipe'; choose one of 1f1b, ours"):
        get_schedule("gpipe", 2, 2)
    with pytest.raises(ConfigError, match="stages must be"):
        get_schedule("1f1b", 0, 2)
    with pytest.raises(ConfigError, match="micro_batches must be"):
        get_schedule("1f1b", 2, 0)
    with pytest.raises(ConfigError, match="1f1b takes no r"):
        get_schedule("1f1b", 2, 2, (1, 0))


def test_compute_r_paper_formula_and_caps() -> None:
    # floor(T_bwd * (S-s-1) / T_fwd_low): 20*3/13 = 4.6, 20*2/13 = 3.07, 20/13 = 1.5.
    assert r_from_times(16, [20] * 4, [13] * 4) == (4, 3, 1, 0)
    assert r_from_times(5, [20] * 4, [13] * 4) == (1, 2, 1, 0)  # M-(S-s) caps: 1, 2, 3
    assert r_from_times(16, [20] * 4, [13] * 4, memory_cap=[2, 9, 0, 0]) == (2, 3, 0, 0)
    # A heavy first stage gives a large r_0; stage 1 may exceed it by one (same warm-up count).
    assert r_from_times(16, [40, 20, 20, 20], [13] * 4) == (9, 3, 1, 0)
    assert r_from_times(16, [20, 60, 20, 20], [13] * 4) == (4, 5, 1, 0)
    # Default: backward = 2 x forward, forwards slowed by the central model at its optimum (x1.31).
    assert compute_r(4, 16) == (4, 3, 1, 0)
    for stages in range(1, 9):
        for micro_batches in range(1, 33):
            r = compute_r(stages, micro_batches)
            get_schedule("ours", stages, micro_batches, r)  # always admissible


def test_compute_r_from_costs_uses_stage_times() -> None:
    costs = CostModel.build(4, fwd_ms=[10, 10, 10, 14], bwd_ms=[20, 20, 20, 28])
    assert compute_r(4, 16, costs) == (4, 3, 1, 0)
    heavy_first = CostModel.build(4, fwd_ms=[10, 10, 10, 10], bwd_ms=[60, 20, 20, 20])
    assert compute_r(4, 16, heavy_first)[0] == 12
    assert get_schedule("ours", 4, 16, costs=heavy_first).r == compute_r(4, 16, heavy_first)


def test_unit_order_and_warmups() -> None:
    assert unit_order(4, 2) == [
        (K.F, 0),
        (K.F, 1),
        (K.B, 0),
        (K.F, 2),
        (K.B, 1),
        (K.F, 3),
        (K.B, 2),
        (K.B, 3),
    ]
    assert warmups(4, 8, (4, 5, 2, 0)) == [8, 8, 4, 1]


@pytest.mark.parametrize(
    ("name", "stages", "micro_batches", "r"),
    [
        ("1f1b", 4, 8, None),
        ("ours", 4, 8, (4, 3, 1, 0)),
        ("ours", 4, 8, (4, 5, 2, 0)),
        ("ours", 3, 5, (0, 0, 0)),
    ],
)
def test_golden_programs(name: str, stages: int, micro_batches: int, r: tuple[int, ...] | None) -> None:
    schedule = get_schedule(name, stages, micro_batches, r)
    suffix = "" if r is None else "_r" + "-".join(map(str, r))
    path = GOLDEN / f"{name}_S{stages}_M{micro_batches}{suffix}.txt"
    if os.environ.get("ENVPIPE_UPDATE_GOLDEN"):
        path.write_text(schedule.render() + "\n")
    assert schedule.render() + "\n" == path.read_text(), (
        f"regenerate with ENVPIPE_UPDATE_GOLDEN=1 if intended: {path}"
    )
