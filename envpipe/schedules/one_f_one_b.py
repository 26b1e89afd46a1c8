"""1F1B with exactly the per-stage order of DeepSpeed's ``TrainSchedule`` (blocking sends).

DeepSpeed runs 2(M+S-1) steps; on stage s a step t is a forward step when t+s is even (F_m at t=2m+s)
and a backward step otherwise (B_m at t=2(m+S)-s-1). Inside a step (DeepSpeed >= 0.15):

    forward step:  SendGrad(previous step's micro-batch)  RecvActivation(m)  ForwardPass(m)
    backward step: RecvGrad(m)  SendActivation(previous step's micro-batch)  BackwardPass(m)

Neighbours are always in steps of opposite kind, so every blocking send meets its receive.
"""

from __future__ import annotations

from envpipe.ir import Action, ActionKind, Schedule, act
from envpipe.schedules.spec import ScheduleSpec

K = ActionKind


def step_unit(step: int, stage: int, stages: int, extra: int = 0) -> tuple[int, bool]:
    """The micro-batch of ``step`` on ``stage`` and whether it is a forward step.

    ``extra`` (EnvPipe's r_s) delays the backwards: B_m at step 2(m+S+r_s)-s-1. The micro-batch may be
    out of range (an idle step).
    """
    if (step + stage) % 2 == 0:
        return (step - stage) // 2, True
    return (step + stage + 1) // 2 - stages - extra, False


def build(stages: int, micro_batches: int) -> Schedule:
    """The 1F1B schedule of DeepSpeed's TrainSchedule for S stages and M micro-batches."""
    programs = tuple(_program(s, stages, micro_batches) for s in range(stages))
    return Schedule("1f1b", stages, micro_batches, (0,) * stages, programs)


def _program(stage: int, stages: int, micro_batches: int) -> tuple[Action, ...]:
    has_prev, has_next = stage > 0, stage < stages - 1
    prog: list[Action] = []
    prev = -1
    for step in range(2 * (micro_batches + stages - 1)):
        mb, forward = step_unit(step, stage, stages)
        valid, prev_valid = 0 <= mb < micro_batches, 0 <= prev < micro_batches
        if forward:
            if has_prev and prev_valid:
                prog.append(act(stage, K.SG, prev))
            if has_prev and valid:
                prog.append(act(stage, K.RA, mb))
            if valid:
                prog.append(act(stage, K.F, mb))
        else:
            if has_next and valid:
                prog.append(act(stage, K.RG, mb))
            if has_next and prev_valid:
                prog.append(act(stage, K.SA, prev))
            if valid:
                prog.append(act(stage, K.B, mb))
        prev = mb
    return tuple(prog)


SPEC = ScheduleSpec(
    "1f1b",
    "1F1B in DeepSpeed's TrainSchedule order, blocking sends (the baseline)",
    lambda stages, micro_batches, r, costs, virtual_stages: build(stages, micro_batches),
    runs_on_deepspeed=True,
)
