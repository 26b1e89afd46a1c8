"""``ours-w``: EnvPipe's ``ours`` with every backward split into ``I`` and ``W`` and the W units deferred.

``ours`` fills the warm-up bubble with ``r_s`` extra forwards (at a low clock); its cool-down bubble stays.
Splitting each backward lets the input gradient (``I``, on the critical path) leave as soon as it can, and
the weight gradient (``W``) of stage s runs ``lag_s`` input-gradient units later, in the bubbles that the
faster gradients leave. Unit order per stage: :func:`envpipe.schedules.zero_bubble.split_order` with the
warm-up of ``ours`` (``min(M, S - s + r_s)``). Peak held activations per stage: ``min(M, S - s + r_s +
lag_s)`` (``ours`` holds ``S - s + r_s``). The default W placement ``lag_s = s`` is ZB-H1's; with r = 0 the
schedule is ZB-H1 itself.

Verified deadlock-free under rendezvous sends (tests); simulated and planned, not run on DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Sequence

from envpipe.ir import Schedule
from envpipe.schedules.ours import check_r, r_builder, warmups
from envpipe.schedules.spec import ScheduleSpec
from envpipe.schedules.zero_bubble import build_split


def default_lags(stages: int) -> list[int]:
    """ZB-H1's W placement: stage s defers its W units by s input-gradient units."""
    return list(range(stages))


def build(
    stages: int, micro_batches: int, r: Sequence[int], lags: Sequence[int] | None = None
) -> Schedule:
    """``ours`` (an admissible r vector, ``envpipe.schedules.ours.check_r``) with W deferred by ``lags``.

    Raises:
        ScheduleError: an r vector that cannot run.
        ConfigError: a negative lag or one lag per stage missing.
    """
    r = check_r(stages, micro_batches, r)
    lags = default_lags(stages) if lags is None else list(lags)
    return build_split("ours-w", stages, micro_batches, warmups(stages, micro_batches, r), lags, r)


SPEC = ScheduleSpec(
    "ours-w",
    "ours with split backwards (I, W deferred into the bubbles) (simulator only)",
    r_builder(build),
    takes_r=True,
)
