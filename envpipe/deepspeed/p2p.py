"""Point-to-point transfers between neighbouring stages, blocking or asynchronous, with per-buffer handles.

Every transfer is an ``isend``/``irecv`` on the default process group; a blocking one waits at once. An
asynchronous send keeps its work handles AND its tensors (so a freed buffer cannot be reused while the send
is in flight) until the schedule's matching wait (``wSA3``) — or until the end of the iteration, where any
left-over handle is drained so nothing grows across iterations. No NCCL_BUFFSIZE tricks: deadlock freedom
comes from the schedule (verified under rendezvous sends), not from the transport's buffering.

Shapes cross a link once: the first activation send carries a small int64 header (dtype and shape of each
tensor); later sends reuse it, so only tensors travel on the hot path.
"""

from __future__ import annotations

from typing import Any

from envpipe.errors import EnvpipeError

_HEADER_LEN = 64  # int64 slots: [n, (dtype_id, ndim, *shape) * n]; plenty for a few hidden-state tensors


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


class Link:
    """Transfers of one stage to and from its neighbours, with pending async sends keyed by (kind, micro-batch)."""

    def __init__(self, stage_id: int, stage_to_rank: Any, device: Any) -> None:
        self.stage_id = stage_id
        self._stage_to_rank = stage_to_rank
        self._device = device
        self._pending: dict[tuple[str, int], list[tuple[Any, Any]]] = {}
        self._recv_spec: tuple[bool, list[tuple[Any, Any]]] | None = None
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
        import torch.distributed as dist

        peer = self._stage_to_rank(dst_stage)
        outgoing = [t.contiguous() for t in as_list(payload)]
        if with_header and not self._header_sent:
            outgoing.insert(0, self._header(payload))
            self._header_sent = True
        works = [(dist.isend(t, peer), t) for t in outgoing]
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

        if self._recv_spec is None:
            self._recv_spec = self._recv_header(src_stage, key)
        is_tensor, spec = self._recv_spec
        tensors = [torch.empty(shape, dtype=dtype, device=self._device) for shape, dtype in spec]
        self.recv_into(tensors, src_stage, key)
        for t in tensors:
            t.requires_grad_(t.is_floating_point())
        return tensors[0] if is_tensor else tuple(tensors)

    def recv_into(self, tensors: list[Any], src_stage: int, key: tuple[str, int]) -> None:
        """Blocking receive of ``tensors`` (already allocated) from ``src_stage``."""
        import torch.distributed as dist

        peer = self._stage_to_rank(src_stage)
        self._wait_works([(dist.irecv(t, peer), t) for t in tensors], key, src_stage)

    # -- helpers ----------------------------------------------------------------------------------------
    def _header(self, payload: Any) -> Any:
        import torch

        ids = {dtype: i for i, dtype in enumerate(_dtypes())}
        tensors = as_list(payload)
        values = [len(tensors), 0 if torch.is_tensor(payload) else 1]
        for t in tensors:
            values += [ids[t.dtype], t.dim(), *t.shape]
        if len(values) > _HEADER_LEN:
            raise EnvpipeError(f"stage output too complex to describe in {_HEADER_LEN} slots: {len(values)}")
        header = torch.zeros(_HEADER_LEN, dtype=torch.int64, device=self._device)
        header[: len(values)] = torch.tensor(values, dtype=torch.int64)
        return header

    def _recv_header(self, src_stage: int, key: tuple[str, int]) -> tuple[bool, list[tuple[Any, Any]]]:
        import torch

        header = torch.zeros(_HEADER_LEN, dtype=torch.int64, device=self._device)
        self.recv_into([header], src_stage, key)
        values = header.tolist()
        spec, pos = [], 2
        for _ in range(values[0]):
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
