"""Pipeline p2p transports: which GPU stream carries each direction of each link (the one registry).

PyTorch's ProcessGroupNCCL runs every unbatched ``isend``/``irecv`` between two ranks of one process group
on one NCCL communicator and one stream, both directions together, in issue order; NCCL's send and
receive are blocking for the GPU and a send larger than NCCL's staging buffer needs its receive to
finish. So what a transport decides is the *stream* of each directed transfer:

* ``link`` (default): one two-rank process group per direction of each stage link (stage s -> s+1, stage
  s+1 -> s), hence one stream per direction. A direction's stream holds only sends on one side and only
  receives on the other, in the same (FIFO-checked) order, so a send waits only for its own receive:
  exactly the rendezvous model the schedule verifier proves deadlock-free. A rank holding several stages
  (interleaved, V-shaped) gets one stream per stage link, so its chunks' transfers never meet on one
  stream; with one stage per rank a stage link is a rank pair.
* ``pair``: every transfer on the default process group (EnvPipe before the NCCL-safe transport, and
  DeepSpeed's stock p2p): both directions of a link share one stream, so a pending send holds up every
  later transfer with that peer, receives included.

Plain Python: the verifier (``envpipe.streams``) and the training adapter (``envpipe.deepspeed.p2p``) both
read this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from envpipe.registry import Registry


@dataclass(frozen=True)
class Transport:
    """How transfers map to p2p streams.

    Attributes:
        name: the registry key.
        directed: True when each direction has its own stream (and process group).
        per_stage: True when streams are per stage link, False when per rank pair (all stages they hold).
        summary: one line for ``--help`` and the docs.
    """

    name: str
    directed: bool
    per_stage: bool
    summary: str

    def stream(self, src_stage: int, dst_stage: int, src_rank: int, dst_rank: int) -> tuple[int, int]:
        """The stream (and process group) carrying a transfer from ``src_stage`` on ``src_rank`` to
        ``dst_stage`` on ``dst_rank``: a pair of stages or of ranks, ordered when ``directed``."""
        a, b = (src_stage, dst_stage) if self.per_stage else (src_rank, dst_rank)
        return (a, b) if self.directed else (min(a, b), max(a, b))


TRANSPORTS: Registry[Transport] = Registry(
    "p2p transport",
    [
        Transport("link", True, True, "one process group (NCCL stream) per direction of each stage link"),
        Transport("pair", False, False, "default process group: one stream per neighbour rank, both directions"),
    ],
)
DEFAULT_TRANSPORT = "link"


def get_transport(name: str) -> Transport:
    """The transport called ``name``.

    Raises:
        ConfigError: an unknown name (the message lists the choices).
    """
    return TRANSPORTS.lookup(name)
