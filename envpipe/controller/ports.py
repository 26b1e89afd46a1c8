"""What the controller needs from the outside, as small protocols (the DeepSpeed adapter and the tests' fakes
implement them): the engine, the ranks' collectives, the agent's energy windows and a listener for progress.

Every rank runs the same controller program in lockstep; decisions are taken on rank 0 and broadcast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class EnginePort(Protocol):
    """The training engine as the controller sees it (one rank, one stage)."""

    stage: int

    def set_plan(self, schedule: Any, clocks: dict[int, dict[str, int]] | None) -> None:
        """Run ``schedule`` with ``clocks`` (stage -> unit -> MHz) from the next step on."""

    def last_timeline(self) -> list[Any]:
        """This stage's unit spans of the last step (``envpipe.sim.UnitSpan``), ms from its start."""

    def timeline_record(self) -> Any:
        """This rank's record of the last step's unit spans, to gather later (no collective)."""

    def gather_timelines(self, records: list[Any]) -> list[list[Any]]:
        """Every stage's spans of each recorded step on one time axis (a collective over the pipeline)."""


class Comm(Protocol):
    """Collectives over every rank of the job."""

    rank: int
    world_size: int

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""

    def barrier(self) -> None:
        """Wait for every rank."""


class Listener(Protocol):
    """Receives the controller's progress events (rank 0 only): ``phase``, ``advance``, ``phase_done``,
    ``message`` (see :mod:`envpipe.train.progress`)."""

    def __call__(self, event: str, **fields: Any) -> None:
        """Handle one event."""


@dataclass(frozen=True)
class Gpu:
    """The card this rank runs on, as the agent reports it."""

    name: str
    clocks_mhz: Sequence[int]

    @property
    def max_clock_mhz(self) -> int:
        """The top SM clock."""
        return max(self.clocks_mhz)


class SingleProcessComm:
    """The collectives of a one-rank job (tests, one-stage runs without torch.distributed)."""

    rank = 0
    world_size = 1

    def broadcast(self, obj: Any) -> Any:
        """``obj`` itself."""
        return obj

    def all_gather(self, obj: Any) -> list[Any]:
        """``[obj]``."""
        return [obj]

    def barrier(self) -> None:
        """Nothing to wait for."""


def log_listener(logger: Any) -> Listener:
    """A listener that logs state changes and messages (the library's default; ``envpipe train`` draws)."""

    def listen(event: str, **fields: Any) -> None:
        if event == "phase":
            logger.info("envpipe: %s", fields.get("label", fields.get("phase")))
        elif event == "phase_done":
            logger.info("envpipe: %s done: %s", fields.get("phase"), fields.get("info", ""))
        elif event == "message":
            text = str(fields.get("text", ""))
            (logger.warning if text.startswith("warning") else logger.info)("envpipe: %s", text)

    return listen
