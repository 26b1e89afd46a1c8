"""The controller's program: every rank runs it in lockstep, one ``yield`` per training step::

warm-up ─► baseline window ─► profiling ─► reconfiguration ─► at-plan ◄──────┐
   │           │  plan file (fingerprint checked): profiling skipped ─► ─┘   │ drift guard:
   │           │  type baseline: no profiling                                │ re-plan
   │           └─ (before it) no agent: unplanned, default clocks, said once └─ compare (opt-in)
   └─ plan file with its stored baseline: no baseline window either ─► at-plan

A plan file's stored baseline (the window it was planned against, in an earlier run) is this run's reference
when it fits (same world size, same kind of energy); an older plan file without one gets the window.
"""

from __future__ import annotations

from envpipe.controller.core import Context, Program
from envpipe.controller.planning import adopt_plan, load_plan, make_plan, reused_baseline
from envpipe.controller.states import baseline as baseline_window
from envpipe.controller.states import profiling, warm_up
from envpipe.controller.steady import at_plan


def program(ctx: Context, *, has_agent: bool) -> Program:
    """The whole run's states, one ``yield`` per training step (see the module docstring)."""
    yield from warm_up(ctx)
    if not has_agent:
        ctx.enter("unplanned", "no agent: training at the card's default clocks", None)
        while True:
            yield
    if ctx.config.mode == "profile":
        ctx.profile = yield from profiling(ctx)
        return
    plan = load_plan(ctx)
    ctx.baseline = None if plan is None else reused_baseline(ctx, plan)
    if ctx.baseline is None:
        ctx.baseline = yield from baseline_window(ctx)
    if plan is not None:
        adopt_plan(ctx, plan)
    else:
        yield from make_plan(ctx)
    yield from at_plan(ctx)
