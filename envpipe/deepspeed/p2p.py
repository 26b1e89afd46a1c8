"""Point-to-point transfers between neighbouring stages, on streams chosen by the p2p transport.

Every transfer is an ``isend``/``irecv``; a blocking one waits at once. An asynchronous send keeps its work
handles AND its tensors (so a freed buffer cannot be reused while the send is in flight) until the
schedule's matching wait (``wSA3``) — or until the end of the iteration, where any left-over handle is
drained so nothing grows across iterations. No NCCL_BUFFSIZE tricks: deadlock freedom comes from the
schedule (verified under rendezvous sends) and from the transport (``envpipe.transports``): with ``link``,
each direction of each link has its own two-rank process group, so its own NCCL stream, and a pending send
never holds up a transfer in the other direction.

Shapes: the first activation send of a link carries an int64 header (dtype and shape of each tensor);
later sends reuse it, unless the pipeline has ``dynamic_shape`` (then every send carries one, as in
DeepSpeed) or :meth:`Link.reset_shapes` was called. A header longer than one 64-slot message continues in a
second message, so any number of tensors may cross a boundary.
"""

from __future__ import annotations

from typing import Any

from envpipe.errors import EnvpipeError
from envpipe.transports import get_transport

_HEADER_LEN = 64  # int64 slots of the first header message: [length, is_tuple, n, (dtype, ndim, *shape) * n]


class PeerLostError(EnvpipeError):
    """A neighbouring stage stopped answering (its process died or the process-group timeout ran out)."""


def _dtypes() -> list[Any]:
    import torch

    return [
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.bool,
    ]


def as_list(tensors: Any) -> list[Any]:
    """A tensor or a flat tuple of tensors as a list (the only shapes that may cross stages)."""
    import torch

    if torch.is_tensor(tensors):
        return [tensors]
    if isinstance(tensors, (tuple, list)) and all(torch.is_tensor(t) for t in tensors):
        return list(tensors)
    raise EnvpipeError(
        f"only a tensor or a flat tuple of tensors can cross stages, got {type(tensors).__name__}; "
        "return hidden states only from a pipe layer"
    )


class Streams:
    """The process group of every p2p stream of this rank, per the transport (built collectively).

    ``pipe_groups`` lists the global ranks of every pipeline (``grid.pipe_groups``); every rank of the world
    must build ``Streams`` with the same arguments at the same time, since creating a group is collective.
    With ``emulate`` (CPU tests), each stream gets its own group and runs on one worker thread in issue
    order with rendezvous sends (``envpipe.deepspeed.nccl_emulation``), as NCCL runs it on a GPU.
    """

    def __init__(
        self, transport: str, pipe_groups: list[list[int]], rank: int, *, emulate_timeout_s: float | None = None
    ) -> None:
        import torch.distributed as dist

        self.transport = get_transport(transport)
        self.emulated = emulate_timeout_s is not None
        self._groups: dict[tuple[int, int], Any] = {}
        keys: list[tuple[int, int]] = []
        for ranks in pipe_groups:
            for a, b in zip(ranks, ranks[1:]):
                for key in (self._key(a, b), self._key(b, a)):
                    if key not in keys:
                        keys.append(key)
        for key in keys:  # same order on every rank: new_group is collective over the world
            if self.transport.directed or self.emulated:
                group = dist.new_group(ranks=sorted(key))
                if rank in key:
                    self._groups[key] = group
            elif rank in key:
                self._groups[key] = None  # the default group: torch's per-peer communicator
        self._workers: dict[tuple[int, int], Any] = {}
        if self.emulated:
            from envpipe.deepspeed.nccl_emulation import EmulatedStream

            self._workers = {
                key: EmulatedStream(group, key[0] if key[1] == rank else key[1], emulate_timeout_s)
                for key, group in self._groups.items()
            }
        self.rank = rank

    def _key(self, src: int, dst: int) -> tuple[int, int]:
        # One stage per rank (DeepSpeed's PipelineEngine): the stage link src -> dst is the rank pair.
        return self.transport.stream(src, dst, src, dst)

    def isend(self, tensor: Any, peer: int) -> Any:
        """Post a send of ``tensor`` to global rank ``peer`` on its stream; returns a work handle."""
        key = self._key(self.rank, peer)
        if self.emulated:
            return self._workers[key].submit("send", tensor)
        import torch.distributed as dist

        return dist.isend(tensor, peer, group=self._groups[key])

    def irecv(self, tensor: Any, peer: int) -> Any:
        """Post a receive into ``tensor`` from global rank ``peer`` on its stream; returns a work handle."""
        key = self._key(peer, self.rank)
        if self.emulated:
            return self._workers[key].submit("recv", tensor)
        import torch.distributed as dist

        return dist.irecv(tensor, peer, group=self._groups[key])


class Link:
    """Transfers of one stage to and from its neighbours, with pending async sends keyed by (kind, micro-batch)."""

    def __init__(self, stage_id: int, stage_to_rank: Any, device: Any, streams: Streams) -> None:
        self.stage_id = stage_id
        self._stage_to_rank = stage_to_rank
        self._device = device
        self.streams = streams
        self.dynamic_shape = False
        self._pending: dict[tuple[str, int], list[tuple[Any, Any]]] = {}
        self._recv_spec: tuple[bool, list[tuple[Any, Any]]] | None = None
        self._header_sent = False

    def reset_shapes(self) -> None:
        """Send and expect a fresh shape header with the next activation (DeepSpeed's reset_activation_shape)."""
        self._recv_spec = None
        self._header_sent = False

    # -- sends ------------------------------------------------------------------------------------------
    def send(
        self,
        key: tuple[str, int],
        payload: Any,
        dst_stage: int,
        *,
        asynchronous: bool,
        with_header: bool = False,
    ) -> None:
        """Send a tensor / flat tuple to ``dst_stage``; async sends stay pending under ``key`` until :meth:`wait`."""
        peer = self._stage_to_rank(dst_stage)
        outgoing = [t.contiguous() for t in as_list(payload)]
        if with_header and (self.dynamic_shape or not self._header_sent):
            outgoing[:0] = self._header(payload)
            self._header_sent = True
        works = [(self.streams.isend(t, peer), t) for t in outgoing]
        if asynchronous:
            self._pending.setdefault(key, []).extend(works)
        else:
            self._wait_works(works, key, dst_stage)

    def wait(self, key: tuple[str, int], peer_stage: int) -> None:
        """Wait for the async send stored under ``key`` (a no-op if it was never async)."""
        self._wait_works(self._pending.pop(key, []), key, peer_stage)

    def drain(self, peer_stage_of: Any) -> None:
        """Wait for every async send still pending (end of iteration)."""
        for key in list(self._pending):
            self.wait(key, peer_stage_of(key))

    # -- receives ---------------------------------------------------------------------------------------
    def recv_activations(self, src_stage: int, key: tuple[str, int]) -> Any:
        """Receive activations from ``src_stage`` into fresh tensors (one set per micro-batch buffer)."""
        import torch

        if self._recv_spec is None or self.dynamic_shape:
            self._recv_spec = self._recv_header(src_stage, key)
        is_tensor, spec = self._recv_spec
        tensors = [torch.empty(shape, dtype=dtype, device=self._device) for shape, dtype in spec]
        self.recv_into(tensors, src_stage, key)
        for t in tensors:
            t.requires_grad_(t.is_floating_point())
        return tensors[0] if is_tensor else tuple(tensors)

    def recv_into(self, tensors: list[Any], src_stage: int, key: tuple[str, int]) -> None:
        """Blocking receive of ``tensors`` (already allocated) from ``src_stage``."""
        peer = self._stage_to_rank(src_stage)
        self._wait_works([(self.streams.irecv(t, peer), t) for t in tensors], key, src_stage)

    # -- helpers ----------------------------------------------------------------------------------------
    def _header(self, payload: Any) -> list[Any]:
        """The header messages describing ``payload``: 64 slots, plus the rest when it is longer."""
        import torch

        ids = {dtype: i for i, dtype in enumerate(_dtypes())}
        tensors = as_list(payload)
        values = [0, 0 if torch.is_tensor(payload) else 1, len(tensors)]
        for t in tensors:
            values += [ids[t.dtype], t.dim(), *t.shape]
        values[0] = len(values)
        values += [0] * max(0, _HEADER_LEN - len(values))
        header = torch.tensor(values, dtype=torch.int64, device=self._device)
        return [header[:_HEADER_LEN], header[_HEADER_LEN:]] if len(values) > _HEADER_LEN else [header]

    def _recv_header(self, src_stage: int, key: tuple[str, int]) -> tuple[bool, list[tuple[Any, Any]]]:
        import torch

        first = torch.zeros(_HEADER_LEN, dtype=torch.int64, device=self._device)
        self.recv_into([first], src_stage, key)
        values = first.tolist()
        if values[0] > _HEADER_LEN:
            rest = torch.zeros(values[0] - _HEADER_LEN, dtype=torch.int64, device=self._device)
            self.recv_into([rest], src_stage, key)
            values += rest.tolist()
        spec, pos = [], 3
        for _ in range(values[2]):
            dtype, ndim = _dtypes()[values[pos]], values[pos + 1]
            spec.append((tuple(values[pos + 2 : pos + 2 + ndim]), dtype))
            pos += 2 + ndim
        return values[1] == 0, spec

    def _wait_works(self, works: list[tuple[Any, Any]], key: tuple[str, int], peer_stage: int) -> None:
        try:
            for work, _ in works:
                work.wait()
        except RuntimeError as exc:  # gloo: "Connection closed by peer", timeouts, …
            kind, microbatch = key
            raise PeerLostError(
                f"stage {self.stage_id} lost stage {peer_stage} (rank {self._stage_to_rank(peer_stage)}) "
                f"during {kind}{microbatch}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                "the job cannot continue — check that rank's log"
            ) from exc
