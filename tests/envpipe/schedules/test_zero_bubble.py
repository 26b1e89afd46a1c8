"""ZB-H1 and ZB-H2: verified deadlock-free, their memory peaks, and their makespan (simulator as oracle)."""

from __future__ import annotations

import pytest

from envpipe.errors import ConfigError, ScheduleError
from envpipe.ir import ActionKind
from envpipe.schedules import get_schedule
from envpipe.schedules.zero_bubble import build_split, split_order
from envpipe.sim import CostModel, simulate
from envpipe.verify import verify

K = ActionKind
SWEEP = [(s, m) for s in range(1, 7) for m in range(1, 13)]


@pytest.mark.parametrize(("stages", "micro_batches"), SWEEP)
def test_zb_h1_and_h2_are_deadlock_free_with_the_papers_memory_peaks(stages: int, micro_batches: int) -> None:
    h1 = verify(get_schedule("zb-h1", stages, micro_batches))
    h2 = verify(get_schedule("zb-h2", stages, micro_batches))
    # ZB-H1 holds at most 1F1B's peak (S micro-batches) on every stage; ZB-H2 at most 2S - 1.
    assert h1.max_in_flight == (min(micro_batches, stages),) * stages
    assert max(h2.max_in_flight) == min(micro_batches, 2 * stages - 1)


def test_split_order_defers_w_by_the_lag() -> None:
    order = [f"{kind}{m}" for _, kind, m in split_order(2, 4, warmup=2, lag=1)]
    assert order == ["F0", "F1", "I0", "F2", "I1", "W0", "F3", "I2", "W1", "I3", "W2", "W3"]


@pytest.mark.parametrize(("stages", "micro_batches"), [(4, 16), (3, 9), (5, 10), (2, 2)])
def test_equal_f_i_w_leave_only_the_unavoidable_fill(stages: int, micro_batches: int) -> None:
    """T_F = T_I = T_W, free transfers: M (F + B) + (S - 1) F -- the last stage cannot start earlier, and
    never waits after that (1F1B waits (S - 1)(F + B))."""
    fwd, bwd = 10.0, 20.0
    costs = CostModel.build(stages, fwd_ms=fwd, bwd_ms=bwd, p2p_latency_ms=0, clock_switch_ms=0)
    for name in ("zb-h1", "zb-h2"):
        result = simulate(get_schedule(name, stages, micro_batches), costs)
        assert result.iteration_time_ms == pytest.approx(micro_batches * (fwd + bwd) + (stages - 1) * fwd)
    one_f_one_b = simulate(get_schedule("1f1b", stages, micro_batches), costs)
    assert one_f_one_b.iteration_time_ms == pytest.approx((micro_batches + stages - 1) * (fwd + bwd))


def test_warm_ups_must_not_grow_along_the_pipeline() -> None:
    with pytest.raises(ConfigError, match="stage 1 runs 3 warm-up forwards but stage 0 only 2"):
        build_split("custom", 2, 4, [2, 3], [0, 0])
    with pytest.raises(ConfigError, match="one warm-up and one W lag per stage"):
        build_split("custom", 2, 4, [2, 1], [0])


def test_zero_bubble_takes_no_r_and_no_virtual_stages() -> None:
    with pytest.raises(ConfigError, match="zb-h1 takes no r vector"):
        get_schedule("zb-h1", 3, 4, [1, 0, 0])
    with pytest.raises(ConfigError, match="zb-h2 holds one stage per rank"):
        get_schedule("zb-h2", 3, 4, virtual_stages=2)


@pytest.mark.parametrize("name", ["zb-h1", "zb-h2", "ours-w", "zb-v"])
def test_gpu_streams_run_on_link_and_hang_on_pair(name: str) -> None:
    """envpipe.streams: one NCCL stream per link direction runs them (verify checks it by default); the
    stock single stream per peer hangs them, as it hangs ours (a pending isend holds up the receives)."""
    from envpipe import streams

    stages = 8 if name == "zb-v" else 4
    schedule = get_schedule(name, stages, 8)
    streams.check(schedule, "link")
    with pytest.raises(ScheduleError, match="hang"):
        streams.check(schedule, "pair")
