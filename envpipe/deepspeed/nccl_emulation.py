"""NCCL's p2p stream semantics on CPU (gloo), for tests: would this transport hang on GPUs?

On a GPU, PyTorch puts the transfers of one process group between two ranks on one NCCL stream; they run
in issue order, and a send larger than NCCL's staging buffer (about 4 MiB) finishes only once its receive
runs. gloo has neither property (its transfers progress independently), so a schedule that hangs on NCCL
trains fine on CPU. :class:`EmulatedStream` restores both: one worker thread per stream runs its transfers
in issue order, and every send waits for an acknowledgement that its receive ran (rendezvous, as an
unbuffered NCCL send). The stream's process group is private to it, so no two threads share a group.

A transfer that makes no progress within ``timeout_s`` raises :class:`P2PStalled` from ``wait()``; the
worker itself stays blocked (as a hung GPU stream would), so a process that saw it must exit with
``os._exit``.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from envpipe.errors import EnvpipeError

_DATA_TAG, _ACK_TAG = 1, 2


class P2PStalled(EnvpipeError):
    """An emulated NCCL stream made no progress in time: on GPUs this schedule and transport would hang."""


class _Transfer:
    """A posted send or receive; ``wait()`` blocks until the stream has run it."""

    def __init__(self, op: str, tensor: Any, stream: EmulatedStream) -> None:
        self.op, self.tensor, self._stream = op, tensor, stream
        self._done = threading.Event()
        self.error: BaseException | None = None

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self._done.set()

    def wait(self) -> bool:
        if not self._done.wait(self._stream.timeout_s):
            raise P2PStalled(
                f"{self.op} with rank {self._stream.peer} made no progress in {self._stream.timeout_s:g} s on "
                f"its emulated NCCL stream (transfers run in issue order, sends wait for their receive): "
                "under NCCL this schedule and transport hang"
            )
        if self.error is not None:
            raise RuntimeError(str(self.error)) from self.error
        return True


class EmulatedStream:
    """One p2p stream: a worker thread running sends and receives with ``peer`` in issue order."""

    def __init__(self, group: Any, peer: int, timeout_s: float) -> None:
        self.group, self.peer, self.timeout_s = group, peer, timeout_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"emulated-nccl-stream-{peer}", daemon=True)
        self._thread.start()

    def submit(self, op: str, tensor: Any) -> _Transfer:
        """Queue a ``"send"`` or ``"recv"`` of ``tensor`` behind every transfer posted before it."""
        transfer = _Transfer(op, tensor, self)
        self._queue.put(transfer)
        return transfer

    def _run(self) -> None:
        import torch
        import torch.distributed as dist

        ack = torch.zeros(1, dtype=torch.uint8)
        while True:
            transfer = self._queue.get()
            try:
                if transfer.op == "send":
                    dist.send(transfer.tensor, self.peer, group=self.group, tag=_DATA_TAG)
                    dist.recv(ack, self.peer, group=self.group, tag=_ACK_TAG)  # rendezvous: its receive ran
                else:
                    dist.recv(transfer.tensor, self.peer, group=self.group, tag=_DATA_TAG)
                    dist.send(ack, self.peer, group=self.group, tag=_ACK_TAG)
            except Exception as exc:  # noqa: BLE001 - handed to the waiter, which raises it in the rank
                transfer.finish(exc)
                continue
            transfer.finish()
