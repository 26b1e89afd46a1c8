"""``EnvpipeEngine``: a stock DeepSpeed ``PipelineEngine`` that executes EnvPipe's schedule IR.

Hook points used, all public in DeepSpeed's pipeline design (no fork, nothing patched globally):
``_train_schedule`` (the schedule factory) returns the translated IR program, ``_INSTRUCTION_MAP`` gains the
IR's instruction classes, and ``_exec_schedule`` dispatches through handlers bound once. Stock handlers do
the model work (``_exec_forward_pass`` / ``_exec_backward_pass``); this class adds what the stock engine
lacks for EnvPipe:

* per-buffer state: each micro-batch has its own loss and received-gradient slot, because ``ours`` runs
  several forwards before the matching backward (the stock engine keeps one ``self.loss``/``grad_layer``);
* async sends that are waited on before their buffer is dropped (``iSA3`` … ``wSA3``), deadlock-free under
  rendezvous semantics without NCCL_BUFFSIZE, on the NCCL-safe ``link`` transport (``envpipe.transports``);
* what stock users rely on: ``set_train_batch_size`` (the schedule is rebuilt for the new micro-batch count),
  ``dynamic_shape`` / ``reset_activation_shape``, activations and gradients partitioned across the model
  parallel group (``pipe_partitioned`` / ``grad_partitioned``), any number of tensors crossing a stage;
* the planner's clock per unit, announced to the agent when the device reaches the unit;
* per-unit spans for reconfiguration, and optional emulated DVFS.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from types import MethodType
from typing import Any, ClassVar

import torch
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.utils import PartitionedTensor

import envpipe.deepspeed.translate as tr
from envpipe.deepspeed.events import make_notifier
from envpipe.deepspeed.p2p import Link, PeerLostError, Streams, as_list
from envpipe.deepspeed.timing import gather, gather_many, make_timer
from envpipe.errors import ConfigError, EnvpipeError
from envpipe.transports import DEFAULT_TRANSPORT

log = logging.getLogger("envpipe.deepspeed")


_LOST_PEER_HINTS = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout", "nccl")


@contextmanager
def _peer_errors(stage_id: int, where: str) -> Iterator[None]:
    """Turn a collective's transport failure (a rank died mid-iteration) into one clear error."""
    try:
        yield
    except PeerLostError:
        raise
    except RuntimeError as exc:
        text = str(exc)
        if not any(hint in text.lower() for hint in _LOST_PEER_HINTS):
            raise
        first_line = text.splitlines()[0] if text else type(exc).__name__
        raise PeerLostError(
            f"stage {stage_id}: {where} failed talking to the other ranks ({first_line}); another rank has "
            "probably died or hung — check the other ranks' logs"
        ) from exc


def _rebuilt(schedule: Any, micro_batches: int) -> Any:
    """``schedule``'s generator run again (same stages and r) for ``micro_batches``, verified."""
    from envpipe.schedules import SCHEDULES, get_schedule
    from envpipe.verify import verify

    if schedule.name not in SCHEDULES:
        raise ConfigError(f"it was not built by a generator ({', '.join(SCHEDULES)})")
    rebuilt = get_schedule(schedule.name, schedule.stages, micro_batches, schedule.r)
    verify(rebuilt)
    return rebuilt


class _ShapeRecorder:
    """Passes a data iterator through, noting the shape of the first batch's input (for the plan fingerprint)."""

    def __init__(self, data_iter: Any, engine: Any) -> None:
        self._it, self._engine = iter(data_iter), engine

    def __iter__(self) -> _ShapeRecorder:
        return self

    def __next__(self) -> Any:
        batch = next(self._it)
        if self._engine.input_shape is None:
            first = batch[0] if isinstance(batch, (tuple, list)) else batch
            first = first[0] if isinstance(first, (tuple, list)) and first else first
            self._engine.input_shape = tuple(getattr(first, "shape", ()))
        return batch


class EnvpipeEngine(PipelineEngine):
    """Pipeline engine running an EnvPipe ``Schedule`` (1f1b or ours) with a clock per unit.

    Build it with :func:`envpipe.deepspeed.initialize`, not directly.
    """

    def __init__(self, *args: Any, envpipe_schedule: Any, p2p_transport: str = DEFAULT_TRANSPORT, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pipe_buffers["losses"] = [None] * self.num_pipe_buffers
        self.pipe_buffers["grads"] = [None] * self.num_pipe_buffers
        self._link = None
        self.set_transport(p2p_transport)
        self._handlers = {cls: MethodType(fn, self) for cls, fn in self._INSTRUCTION_MAP.items()}
        self._timer = make_timer(self.device.type == "cuda")
        self._notifier = make_notifier(None, False)
        self._stretcher = None
        self.max_clock_mhz: int | None = None
        self._unit_clocks: dict[str, int | None] = {}
        self._clocks = None
        self._timeline: list[Any] | None = None
        self.controller: Any = None  # an envpipe.controller.Controller drives train_batch when set
        self.input_shape: tuple[int, ...] | None = None  # the first stage's first input tensor shape
        self.owned_client: Any = None  # the agent client initialize() created (closed by close())
        self.set_schedule(envpipe_schedule)

    # -- configuration ----------------------------------------------------------------------------------
    def attach(self, agent: Any, *, max_clock_mhz: int | None, stretcher: Any = None) -> None:
        """Connect the phase-event notifier (agent may be None) and the DVFS emulation (may be None)."""
        self._notifier.close()
        self._notifier = make_notifier(agent, self._timer.on_device)
        self.max_clock_mhz = max_clock_mhz
        self._stretcher = stretcher
        self.set_clocks(self._clocks)

    def set_transport(self, name: str, *, emulate_timeout_s: float | None = None) -> None:
        """Carry p2p transfers on transport ``name`` (``envpipe.transports``); collective over every rank.

        Args:
            name: ``link`` (NCCL-safe, default) or ``pair`` (one stream per neighbour, both directions).
            emulate_timeout_s: CPU tests only: run each stream as NCCL would (issue order, rendezvous
                sends, ``envpipe.deepspeed.nccl_emulation``); a transfer stuck this long raises ``P2PStalled``.
        """
        streams = Streams(name, self.grid.pipe_groups, self.global_rank, emulate_timeout_s=emulate_timeout_s)
        self._link = Link(self.stage_id, self.grid.stage_to_global, self.device, streams)

    def set_train_batch_size(self, train_batch_size: int) -> None:
        """DeepSpeed's ``set_train_batch_size``, with the schedule rebuilt (and verified) for the new
        micro-batch count; a schedule that cannot be rebuilt is refused and the batch size left unchanged.

        Raises:
            ConfigError: the schedule cannot run with the new number of micro-batches.
        """
        old_batch_size, old = self.train_batch_size(), self.schedule
        super().set_train_batch_size(train_batch_size)
        if self.micro_batches == old.micro_batches:
            return
        micro_batches = self.micro_batches
        try:
            schedule = _rebuilt(old, micro_batches)
        except EnvpipeError as exc:
            super().set_train_batch_size(old_batch_size)
            raise ConfigError(
                f"set_train_batch_size({train_batch_size}) needs {micro_batches} micro-batches but "
                f"schedule {old.name!r} cannot be rebuilt for them: {exc}; call set_schedule() with one "
                "for that many micro-batches first"
            ) from exc
        if self._clocks:
            log.warning(
                "set_train_batch_size: the clock plan was made for %d micro-batches; every unit runs at the "
                "top clock until set_clocks() gets a plan for %d", old.micro_batches, self.micro_batches
            )
        self._clocks = None
        self.set_schedule(schedule)

    def reset_activation_shape(self) -> None:
        """DeepSpeed's ``reset_activation_shape``: the next activation sends and expects a new shape header."""
        super().reset_activation_shape()
        self._link.reset_shapes()

    def set_schedule(self, schedule: Any) -> None:
        """Run ``schedule`` from the next iteration on (same stage and micro-batch counts).

        Raises:
            ConfigError: the schedule's stages or micro-batches do not match the engine's.
        """
        if schedule.stages != self.num_stages or schedule.micro_batches != self.micro_batches:
            raise ConfigError(
                f"schedule {schedule.name!r} is for {schedule.stages} stages x {schedule.micro_batches} micro-batches, "
                f"the engine runs {self.num_stages} x {self.micro_batches} (gradient_accumulation_steps)"
            )
        self.schedule = schedule
        self._pipe_schedule = tr.IRPipeSchedule(schedule, self.stage_id)
        self._units = tr.unit_names(schedule, self.stage_id)
        self.set_clocks(self._clocks)

    def set_clocks(self, clocks: dict[Any, dict[str, int]] | None) -> None:
        """Use ``clocks`` (stage → unit → MHz) from the next unit on; None runs every unit at the top clock.

        Raises:
            ConfigError: the plan names a unit this stage does not run.
        """
        mine = {}
        if clocks is not None:
            mine = dict(clocks.get(self.stage_id, clocks.get(str(self.stage_id), {})))
            unknown = sorted(set(mine) - set(self._units))
            if unknown:
                raise ConfigError(
                    f"clock plan names units {unknown} that stage {self.stage_id} does not run "
                    f"in schedule {self.schedule.name!r}; its units are {self._units}"
                )
        self._clocks = clocks
        self._unit_clocks = {unit: mine.get(unit, self.max_clock_mhz) for unit in self._units}

    def close(self) -> None:
        """Stop the notifier thread; release and close the agent client if ``initialize`` created it."""
        self._notifier.close()
        owned, self.owned_client = self.owned_client, None
        if owned is not None:
            try:
                owned.release()
            except Exception:  # noqa: BLE001 - the agent may be gone; its lease expiry resets the GPU then
                pass
            owned.close()

    # -- iteration --------------------------------------------------------------------------------------
    def train_batch(self, data_iter: Any = None) -> Any:
        """Run one iteration (one optimizer step); returns the mean loss over micro-batches (same on all stages).

        With a controller (``envpipe.deepspeed.initialize``) the step runs at what the controller's state asks
        for (baseline, profiling clock, reconfiguration round, the plan).
        """
        if self.input_shape is None and data_iter is not None:
            data_iter = _ShapeRecorder(data_iter, self)
        if self.controller is not None:
            return self.controller.step(lambda: self._run_batch(data_iter))
        return self._run_batch(data_iter)

    def _run_batch(self, data_iter: Any) -> Any:
        self._timeline = None
        self._link.dynamic_shape = bool(self.dynamic_shape)
        self._timer.start_iteration()
        with _peer_errors(self.stage_id, "train_batch"):
            return super().train_batch(data_iter)

    def _train_schedule(self) -> tr.IRPipeSchedule:
        return self._pipe_schedule

    def _exec_schedule(self, pipe_schedule: Any) -> None:
        self._reserve_pipe_buffers(pipe_schedule.num_pipe_buffers())
        self.fwd_outputs = []
        handlers = self._handlers
        for step in pipe_schedule:
            for cmd in step:
                handler = handlers.get(type(cmd))
                if handler is None:
                    raise RuntimeError(f"{type(self).__name__} does not understand instruction {cmd!r}")
                handler(**cmd.kwargs)

    def last_timeline(self) -> list[Any]:
        """This stage's unit spans of the last iteration, ms from its start (waits for the device on GPU)."""
        if self._timeline is None:
            self._timeline = self._timer.spans(self.stage_id)
            if self._stretcher is not None and self._timer.on_device:
                self._stretcher.observe_gpu(self._timer.splits_ms())
        return self._timeline

    def timeline_record(self) -> tuple[float, list[Any]]:
        """``(wall-clock start, last_timeline())`` of the last iteration, to gather later with
        :meth:`gather_timelines` (outside a measured window: no collective per iteration)."""
        return self._timer.origin_wall_s, self.last_timeline()

    def gather_timelines(self, records: list[tuple[float, list[Any]]]) -> list[list[Any]]:
        """:meth:`gather_timeline` for several iterations' records in one collective over the pipeline group."""
        with _peer_errors(self.stage_id, "gather_timelines"):
            return gather_many(records, self.grid.get_pipe_parallel_group())

    def gather_timeline(self) -> list[Any]:
        """Every stage's spans of the last iteration on one time axis (collective over the pipeline group)."""
        with _peer_errors(self.stage_id, "gather_timeline"):
            return gather(
                self.last_timeline(), self._timer.origin_wall_s, self.grid.get_pipe_parallel_group()
            )

    # -- units ------------------------------------------------------------------------------------------
    def _unit_begin(self, unit: str) -> None:
        marker = self._timer.begin(unit)
        self._notifier.send(unit, "begin", self._unit_clocks[unit] or 0, marker)

    def _unit_end(self, unit: str) -> None:
        clock_mhz = self._unit_clocks[unit]
        stretcher = self._stretcher
        if stretcher is not None:
            if self._timer.on_device:
                self._timer.mark_compute_end(unit)
                stretcher.stretch_gpu(unit, clock_mhz)
            else:
                stretcher.stretch_cpu(self._timer.elapsed_s(unit), clock_mhz)
        marker = self._timer.end(unit, clock_mhz)
        self._notifier.send(unit, "end", clock_mhz or 0, marker)

    def _exec_run_forward(self, buffer_id: int, unit: str) -> None:
        self._unit_begin(unit)
        PipelineEngine._exec_forward_pass(self, buffer_id)
        if self.is_last_stage():
            self.pipe_buffers["losses"][buffer_id] = self.loss  # per buffer: several forwards may precede B
        self._unit_end(unit)

    def _exec_run_backward(self, buffer_id: int, unit: str) -> None:
        self._unit_begin(unit)
        buffers = self.pipe_buffers
        if self.is_last_stage():
            self.loss, buffers["losses"][buffer_id] = buffers["losses"][buffer_id], None
        else:
            self.grad_layer, buffers["grads"][buffer_id] = buffers["grads"][buffer_id], None
        PipelineEngine._exec_backward_pass(self, buffer_id)
        self.grad_layer = None
        buffers["outputs"][buffer_id] = None
        if self.is_first_stage():  # no SendGrad frees the first stage's inputs
            buffers["inputs"][buffer_id] = None
        if self.is_last_stage():
            buffers["labels"][buffer_id] = None
        self._unit_end(unit)

    # -- communication ----------------------------------------------------------------------------------
    def _exec_send_act(self, buffer_id: int, asynchronous: bool) -> None:
        outputs = self.pipe_buffers["outputs"][buffer_id]
        self._link.send(
            ("SA", buffer_id), outputs, self.next_stage, asynchronous=asynchronous, with_header=True
        )

    def _exec_recv_act(self, buffer_id: int) -> None:
        self.pipe_buffers["inputs"][buffer_id] = self._link.recv_activations(
            self.prev_stage, ("RA", buffer_id)
        )

    def _exec_send_grad(self, buffer_id: int, asynchronous: bool) -> None:
        inputs = self.pipe_buffers["inputs"][buffer_id]
        if self.is_grad_partitioned:  # as DeepSpeed: the first gradient split over the model-parallel group
            first, *tail = as_list(inputs)
            part = PartitionedTensor(tensor=first.grad, group=self.grid.get_slice_parallel_group())
            grads = [part.to_meta(), part.data(), *(t.grad for t in tail if t.is_floating_point())]
        else:
            grads = [t.grad for t in as_list(inputs) if t.is_floating_point()]
        if any(g is None for g in grads):
            raise RuntimeError(
                f"stage {self.stage_id}: no input gradient for micro-batch {buffer_id}; "
                "was its backward run before SG?"
            )
        payload = grads[0] if len(grads) == 1 and torch.is_tensor(inputs) else tuple(grads)
        self._link.send(("SG", buffer_id), payload, self.prev_stage, asynchronous=asynchronous)
        self.pipe_buffers["inputs"][buffer_id] = None  # an async send keeps its own reference until waited

    def _exec_recv_grad(self, buffer_id: int) -> None:
        outputs = self.pipe_buffers["outputs"][buffer_id]
        if self.is_grad_partitioned:  # meta + local part of the first gradient, then the other gradients
            expected = [outputs[0], outputs[1], *(t for t in outputs[2:] if t.is_floating_point())]
        else:
            if self.is_pipe_partitioned:  # a full gradient for a partitioned output: rebuild the output first
                outputs = self._full_partitioned_output(buffer_id)
            expected = [t for t in as_list(outputs) if t.is_floating_point()]
        grads = [torch.empty_like(t) for t in expected]
        self._link.recv_into(grads, self.next_stage, ("RG", buffer_id))
        self.pipe_buffers["grads"][buffer_id] = grads[0] if torch.is_tensor(outputs) else grads

    def _full_partitioned_output(self, buffer_id: int) -> Any:
        outputs = self.pipe_buffers["outputs"][buffer_id]
        full = PartitionedTensor.from_meta(
            meta=outputs[0].to("cpu"), local_part=outputs[1], group=self.grid.get_slice_parallel_group()
        ).full()
        outputs[0].data = full
        outputs = (outputs[0], *outputs[2:])
        self.pipe_buffers["outputs"][buffer_id] = outputs
        return outputs

    def _exec_wait_send(self, buffer_id: int, kind: str) -> None:
        self._link.wait((kind, buffer_id), self.next_stage if kind == "SA" else self.prev_stage)

    def _exec_drain_sends(self) -> None:
        self._link.drain(lambda key: self.next_stage if key[0] == "SA" else self.prev_stage)

    _INSTRUCTION_MAP: ClassVar[dict[type, Any]] = {
        **PipelineEngine._INSTRUCTION_MAP,
        tr.RunForward: _exec_run_forward,
        tr.RunBackward: _exec_run_backward,
        tr.SendActivationIR: _exec_send_act,
        tr.RecvActivationIR: _exec_recv_act,
        tr.SendGradIR: _exec_send_grad,
        tr.RecvGradIR: _exec_recv_grad,
        tr.WaitSendIR: _exec_wait_send,
        tr.DrainSends: _exec_drain_sends,
    }
