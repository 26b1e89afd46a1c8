"""Schedule IR → DeepSpeed instructions for one stage, and the ``PipeSchedule`` that replays them.

The IR's per-rank program (``schedule.programs[s]``: ``sF3``, ``sRA3``, ``siSA3``, ``swSA3``, ``sB3``, …; one
stage per rank here, since DeepSpeed's PipelineEngine runs one) is
already an exact execution order, so each action becomes one DeepSpeed step of one instruction (plus the
micro-batch load before a forward on the first and last stage) — no step arithmetic is re-derived here.
Buffers are indexed by micro-batch: ``ours`` runs up to ``S - s + r_s`` forwards before the matching
backward, so loss, activations and received gradients are kept per micro-batch, never in one slot.
"""

from __future__ import annotations

from typing import Any

from deepspeed.runtime.pipe import schedule as ds_schedule

from envpipe.errors import ScheduleError


class UnitInstruction(ds_schedule.BufferOpInstruction):
    """A compute unit (forward or backward) of micro-batch ``buffer_id``, named ``unit`` ("F3", "B3")."""


class RunForward(UnitInstruction):
    """Forward pass of one micro-batch; on the last stage its loss is kept in that micro-batch's slot."""


class RunBackward(UnitInstruction):
    """Backward pass of one micro-batch from its own loss or received gradient."""


class SendActivationIR(ds_schedule.BufferOpInstruction):
    """Send the micro-batch's outputs to the next stage; ``asynchronous`` leaves it pending until a wait."""


class RecvActivationIR(ds_schedule.BufferOpInstruction):
    """Receive the micro-batch's inputs from the previous stage into a fresh buffer."""


class SendGradIR(ds_schedule.BufferOpInstruction):
    """Send the gradient of the micro-batch's inputs to the previous stage; may be asynchronous."""


class RecvGradIR(ds_schedule.BufferOpInstruction):
    """Receive the gradient of the micro-batch's outputs from the next stage into its own buffer."""


class WaitSendIR(ds_schedule.BufferOpInstruction):
    """Wait for an earlier asynchronous send (``kind`` "SA" or "SG") of the micro-batch."""


class DrainSends(ds_schedule.PipeInstruction):
    """Wait for every asynchronous send still pending before the optimizer step."""


_COMM = {"SA": SendActivationIR, "SG": SendGradIR}


def _kind(action: Any) -> str:
    kind = action.kind
    return getattr(kind, "value", kind)


def translate(schedule: Any, stage: int) -> list[ds_schedule.PipeInstruction]:
    """The flat instruction list of ``stage`` for one iteration of ``schedule``.

    Raises:
        ScheduleError: an action that cannot run on this stage (a receive on the first stage, a micro-batch
            out of range, a wait with no earlier async send, an unknown kind).
    """
    stages, micro_batches = schedule.stages, schedule.micro_batches
    if not 0 <= stage < stages:
        raise ScheduleError(f"stage {stage} outside 0..{stages - 1} of schedule {schedule.name!r}")
    schedule.require_one_stage_per_rank("DeepSpeed's PipelineEngine")
    loads = stage in (0, stages - 1)
    pending_async: set[tuple[str, int]] = set()
    out: list[ds_schedule.PipeInstruction] = []
    for action in schedule.programs[stage]:
        kind, mb = _kind(action), action.microbatch
        where = f"stage {stage} action {action} of schedule {schedule.name!r}"
        if not 0 <= mb < micro_batches:
            raise ScheduleError(f"{where}: micro-batch {mb} outside 0..{micro_batches - 1}")
        _check_neighbour(kind, stage, stages, where)
        if kind == "F":
            if loads:
                out.append(ds_schedule.LoadMicroBatch(mb))
            out.append(RunForward(mb, unit=f"F{mb}"))
        elif kind == "B":
            out.append(RunBackward(mb, unit=f"B{mb}"))
        elif kind in _COMM:
            asynchronous = bool(getattr(action, "asynchronous", False))
            if asynchronous:
                pending_async.add((kind, mb))
            out.append(_COMM[kind](mb, asynchronous=asynchronous))
        elif kind == "RA":
            out.append(RecvActivationIR(mb))
        elif kind == "RG":
            out.append(RecvGradIR(mb))
        elif kind == "WAIT":
            waited = getattr(action.waits, "value", action.waits)
            if (waited, mb) not in pending_async:
                raise ScheduleError(
                    f"{where}: waits for {waited}{mb}, which was not sent asynchronously before"
                )
            pending_async.discard((waited, mb))
            out.append(WaitSendIR(mb, kind=waited))
        elif kind in ("I", "W"):
            raise ScheduleError(
                f"{where}: DeepSpeed's PipelineEngine runs full backwards (B) only, not split I/W units; "
                "run this schedule in the simulator"
            )
        else:
            raise ScheduleError(f"{where}: unknown action kind {kind!r}")
    out += [
        DrainSends(),
        ds_schedule.ReduceTiedGrads(),
        ds_schedule.ReduceGrads(),
        ds_schedule.OptimizerStep(),
    ]
    return out


def _check_neighbour(kind: str, stage: int, stages: int, where: str) -> None:
    if kind in ("RA", "SG") and stage == 0:
        raise ScheduleError(f"{where}: the first stage has no previous stage to talk to")
    if kind in ("SA", "RG") and stage == stages - 1:
        raise ScheduleError(f"{where}: the last stage has no next stage to talk to")


def unit_names(schedule: Any, stage: int) -> list[str]:
    """The compute units of ``stage`` in execution order ("F0", "F1", "B0", …)."""
    return [f"{_kind(a)}{a.microbatch}" for a in schedule.programs[stage] if _kind(a) in ("F", "B")]


class IRPipeSchedule(ds_schedule.PipeSchedule):
    """A DeepSpeed ``PipeSchedule`` replaying a translated program: one instruction per step."""

    def __init__(self, schedule: Any, stage_id: int) -> None:
        super().__init__(micro_batches=schedule.micro_batches, stages=schedule.stages, stage_id=stage_id)
        self.instructions = translate(schedule, stage_id)

    def steps(self):
        """Yield each instruction as its own step (the program order is the execution order)."""
        for instruction in self.instructions:
            yield [instruction]

    def num_pipe_buffers(self) -> int:
        """One slot per micro-batch: slots are freed after use, so only live ones hold memory."""
        return self.micro_batches


_FROM_DEEPSPEED = {
    ds_schedule.ForwardPass: "F",
    ds_schedule.BackwardPass: "B",
    ds_schedule.SendActivation: "SA",
    ds_schedule.RecvActivation: "RA",
    ds_schedule.SendGrad: "SG",
    ds_schedule.RecvGrad: "RG",
}


def from_pipe_schedule(schedule_cls: Any, stages: int, micro_batches: int, name: str = "deepspeed") -> Any:
    """A DeepSpeed ``PipeSchedule`` class (e.g. stock ``TrainSchedule``) as an IR schedule, for the verifiers.

    DeepSpeed's instructions name buffer slots, not micro-batches; each kind runs its micro-batches in
    order (true of ``TrainSchedule``), so the k-th instruction of a kind is micro-batch k. Sends and
    receives are blocking, as DeepSpeed's ``p2p.send``/``p2p.recv``.
    """
    from envpipe.ir import Action, ActionKind, Schedule

    programs = []
    for stage in range(stages):
        counts: dict[str, int] = {}
        program = []
        for step in schedule_cls(micro_batches=micro_batches, stages=stages, stage_id=stage).steps():
            for cmd in step:
                kind = _FROM_DEEPSPEED.get(type(cmd))
                if kind is not None:
                    program.append(Action(stage, ActionKind(kind), counts.get(kind, 0)))
                    counts[kind] = counts.get(kind, 0) + 1
        programs.append(tuple(program))
    return Schedule(name, stages, micro_batches, (0,) * stages, tuple(programs))
