"""The phases of a run, executed in lockstep by every rank.

Baseline window → profiling → reconfiguration → steady phase (type ``baseline`` skips the middle two).

Every rank runs the same number of iterations in every phase (DeepSpeed's pipeline needs all stages in each
``train_batch``); decisions (window lengths, the schedule, clock plans) are made on rank 0 and broadcast.
Energy comes from the agent's windows, one per rank (= per stage), gathered on rank 0.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from envpipe.train.progress import emit
from envpipe.train.worker import RankContext, top_clock_plan

# Iterations per reconfiguration round: the Reconfigurer sees their per-unit median timeline.
RECONFIG_SAMPLES = 3


@dataclass
class Window:
    """One measured stretch of iterations (rank 0's view, every stage's energy included)."""

    iterations: int
    statistic: str
    iteration_ms: float
    iteration_ms_median: float
    stage_energy_j: dict[int, float | None]  # per iteration, summed over replicas; None = agent unavailable
    simulated: bool
    losses: list[float]
    stage_unit_ms: dict[int, dict[str, float]] = field(default_factory=dict)  # stage → {"F": ms, "B": ms}
    span_iteration_ms: float | None = None  # median first-unit-start to last-unit-end, all stages
    # Diagnostic (sim agent only): the same power model applied to the ranks' own unit timestamps, per
    # iteration and stage. The sim agent stamps events when it handles them; the gap shows its error.
    span_energy_j: dict[int, float | None] = field(default_factory=dict)

    @property
    def energy_j(self) -> float | None:
        """Energy per iteration, all stages; None when the agent could not measure some stage's window."""
        values = list(self.stage_energy_j.values())
        return None if any(v is None for v in values) else sum(values)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (stage keys as strings)."""
        data = asdict(self)
        data["stage_energy_j"] = {str(s): e for s, e in self.stage_energy_j.items()}
        data["stage_unit_ms"] = {str(s): u for s, u in self.stage_unit_ms.items()}
        data["span_energy_j"] = {str(s): e for s, e in self.span_energy_j.items()}
        data["energy_j"] = self.energy_j
        return data


class EnergyMeter:
    """This rank's agent energy windows; a dead or stuck agent costs one warning, never the run.

    ``window_begin``/``window_end`` raise ``AgentError`` (``AgentUnavailable`` after the client's timeout)
    when the agent is gone or stopped; the window's energy is then ``None`` (unavailable, not zero) and
    training goes on. The next window asks the agent again (it may have come back).
    """

    def __init__(self, client: Any, *, announce: bool) -> None:
        """``announce``: rank 0 shows the warning on the console; other ranks write it to their log."""
        self.client = client
        self.announce = announce
        self.unavailable = 0  # windows of this rank without energy

    def begin(self) -> int | None:
        """Open a window; None when the agent did not answer."""
        from envpipe_agent.errors import AgentError

        try:
            return self.client.window_begin()
        except AgentError as exc:
            self._failed(exc)
            return None

    def end(self, window_id: int | None) -> Any:
        """Close a window: an ``EnergyWindow``, or None when it was never opened or the agent did not answer."""
        from envpipe_agent.errors import AgentError

        if window_id is None:
            return None
        try:
            return self.client.window_end(window_id)
        except AgentError as exc:
            self._failed(exc)
            return None

    def _failed(self, exc: Exception) -> None:
        self.unavailable += 1
        if self.unavailable > 1:
            return  # warn once: a dead agent fails every window, the summary counts them
        text = (
            f"the agent did not answer an energy window ({type(exc).__name__}: {exc}); training goes on, "
            "and windows without an answer are reported as energy unavailable"
        )
        if self.announce:
            emit("message", text=f"warning: {text}")
        else:
            print(f"warning: {text}", file=sys.stderr, flush=True)


class PhaseRunner:
    """Runs the phases on one rank; rank 0 also builds the result."""

    def __init__(self, ctx: RankContext) -> None:
        """Start on the engine's initial schedule (1F1B) and clocks (every unit at the top clock)."""
        from envpipe.schedules import get_schedule

        self.ctx = ctx
        self.config = ctx.config
        self.schedule = get_schedule("1f1b", self.config.stages, self.config.micro_batches)
        self._one_f_one_b = self.schedule  # the baseline's schedule, for the interleaved comparison
        self.clocks = top_clock_plan(self.schedule, ctx.max_clock_mhz)
        self.iteration_s_estimate = 0.0
        self.idle_power_w = 0.0
        self.baseline_span_ms: float | None = None
        self.planned = False  # a clock plan came from a profile (set on every rank by plan())
        self.last_timeline: list[Any] = []  # every stage's spans of the last iteration measured with spans
        self.phases: list[dict[str, Any]] = []
        self.meter = EnergyMeter(ctx.client, announce=ctx.is_rank0)
        self.unavailable_windows = 0  # windows where some stage's energy is unavailable (same on every rank)

    # -- measurement ------------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Run unmeasured iterations, then estimate the iteration time from the last one.

        They take first-touch allocations, gloo connections and allocator growth out of the baseline.
        """
        for _ in range(self.config.warmup_steps):
            start = time.perf_counter()
            self.ctx.engine.train_batch(self.ctx.data_iter)
            elapsed_s = time.perf_counter() - start
        self.iteration_s_estimate = _broadcast(elapsed_s)

    def idle_power(self) -> float | None:
        """Mean power of an idle GPU (all ranks wait together), for the profile's active-power split.

        None when no rank's agent answered.
        """
        import torch.distributed as dist

        seconds = 0.2 if self.ctx.agent_simulated else max(1.0, self.config.min_window_s)
        dist.barrier()
        window_id = self.meter.begin()
        time.sleep(seconds)
        energy = self.meter.end(window_id)
        power_w = None if energy is None else energy.energy_j / max(energy.duration_s, 1e-9)
        powers = [p for p in _all_gather(power_w) if p is not None]
        self.idle_power_w = statistics.fmean(powers) if powers else None
        return self.idle_power_w

    def window_iterations(self, requested: int) -> int:
        """Enough iterations for a real agent's energy window (>= min_window_s); the sim agent is exact."""
        from envpipe.profiling import iterations_per_clock

        if self.ctx.agent_simulated or self.iteration_s_estimate <= 0:
            return requested
        return iterations_per_clock(
            requested, self.iteration_s_estimate * 1e3, min_window_s=self.config.min_window_s
        )

    def measure(
        self,
        phase: str,
        iterations: int,
        *,
        info: str = "",
        offset: int = 0,
        total: int = 0,
        spans: bool = False,
        settle: bool = False,
    ) -> Window:
        """Run ``iterations`` in one energy window; every rank returns the same :class:`Window`.

        One window, not one per iteration: the sim agent integrates power over the time it handles the
        phase events, and a window mark makes it handle the queued ones at once, so short windows on a busy
        CPU under-count busy time. A real agent's counter needs >= ``min_window_s`` anyway. With ``spans``
        every iteration's timeline is also kept and gathered once the window is closed, for the
        first-unit-to-last-unit iteration time the Reconfigurer works in: a collective per iteration
        inside the window added its time (idle power) to the windows that gathered and not to the others,
        a bias of ~1 % against the plan on CPU ranks. ``settle`` runs one unmeasured iteration first: the
        first iteration after a switch of schedule or clocks (new buffers, the agent applying the clock)
        is not typical of either side.
        """
        import torch.distributed as dist

        ctx = self.ctx
        if settle:
            ctx.engine.train_batch(ctx.data_iter)
        dist.barrier()
        window_id = self.meter.begin()
        times_ms, losses, units, records, busy = [], [], {"F": [], "B": []}, [], _BusyTally(self._sim_card())
        for i in range(iterations):
            start = time.perf_counter()
            # float() waits for the loss on GPU: the iteration's time includes all its work.
            losses.append(float(ctx.engine.train_batch(ctx.data_iter)))
            times_ms.append((time.perf_counter() - start) * 1000.0)
            _collect_unit_ms(ctx.engine.last_timeline(), units)
            busy.add(ctx.engine.last_timeline())
            if spans:
                records.append(ctx.engine.timeline_record())
            if ctx.is_rank0 and total:
                emit(
                    "advance",
                    phase=phase,
                    completed=offset + i + 1,
                    info=f"{info}loss {losses[-1]:.3f} · {times_ms[-1]:.0f} ms/it",
                )
        dist.barrier()
        energy = self.meter.end(window_id)
        timelines = ctx.engine.gather_timelines(records) if spans else []
        if timelines:
            self.last_timeline = timelines[-1]
        span_ms = [_span_iteration_ms(t) for t in timelines]
        local_units = {k: statistics.median(v) for k, v in units.items() if v}
        energy_j = None if energy is None else energy.energy_j / iterations
        simulated = ctx.agent_simulated if energy is None else bool(energy.simulated)
        span_j = busy.energy_j(energy.duration_s) / iterations if energy is not None and busy.card else None
        gathered = _all_gather((ctx.stage, energy_j, simulated, local_units, span_j))
        window = Window(
            iterations=iterations,
            statistic="mean over one energy window",
            iteration_ms=statistics.fmean(times_ms),
            iteration_ms_median=statistics.median(times_ms),
            stage_energy_j=_sum_by_stage(gathered),
            simulated=all(g[2] for g in gathered),
            losses=losses,
            stage_unit_ms={g[0]: g[3] for g in gathered},
            span_iteration_ms=statistics.median(span_ms) if span_ms else None,
            span_energy_j=_sum_by_stage([(g[0], g[4]) for g in gathered]),
        )
        if window.energy_j is None:
            self.unavailable_windows += 1
        return window

    # -- phases ---------------------------------------------------------------------------------------

    def baseline(self) -> Window:
        """1F1B with every unit at the top clock: the reference of the saving."""
        n = self.window_iterations(self.config.baseline_steps)
        self._start("baseline", "baseline window (1f1b, top clock)", n)
        window = self.measure("baseline", n, total=n, spans=True)
        self.baseline_span_ms = window.span_iteration_ms
        self._done("baseline", f"{window.iteration_ms:.0f} ms/it · {_joules(window)}")
        self.phases.append({"name": "baseline", "schedule": "1f1b", **window.to_dict()})
        return window

    def profiling(self) -> dict[str, Any]:
        """Every candidate clock on every stage for a few iterations: the energy valley per stage."""
        from envpipe.train.planning import build_profile, candidate_clocks

        candidates = candidate_clocks(
            self.ctx.clocks_mhz, self.config.profile_clocks, self.config.profile_min_ratio
        )
        n = self.window_iterations(self.config.profile_steps)
        idle_power_w = self.idle_power()
        if self.ctx.is_rank0 and self.iteration_s_estimate > 0:
            from envpipe.profiling import profiling_cost

            cost = profiling_cost(
                candidates,
                2 * n,
                self.iteration_s_estimate * 1e3,
                warmup_iterations=0,
                min_window_s=0.0 if self.ctx.agent_simulated else self.config.min_window_s,
            )
            emit("message", text=f"profiling {', '.join(map(str, candidates))} MHz: {cost.describe()}")
        # Down the clocks and back up: a drift (a busy neighbour, a warming cache) then hits every clock
        # alike instead of making the last clocks look cheaper or dearer than the first.
        order = candidates + candidates[::-1]
        self._start("profiling", f"profiling ({len(candidates)} clocks)", n * len(order))
        windows: dict[int, list[Window]] = {}
        for k, clock_mhz in enumerate(order):
            self._set(self.schedule, top_clock_plan(self.schedule, clock_mhz))
            window = self.measure(
                "profiling", n, info=f"{clock_mhz} MHz · ", offset=k * n, total=n * len(order), settle=True
            )
            windows.setdefault(clock_mhz, []).append(window)
        points = [(clock_mhz, _merge_windows(windows[clock_mhz])) for clock_mhz in candidates]
        profile = None
        measured = [(c, w) for c, w in points if w.energy_j is not None]
        if self.ctx.is_rank0 and (idle_power_w is None or not measured):
            # No energy, no valley: the plan falls back to the top clocks (see plan()).
            self._done("profiling", "energy unavailable (agent did not answer): top clocks kept")
        elif self.ctx.is_rank0:
            profile = build_profile(
                measured,
                gpu_name=self.ctx.gpu_name,
                clocks_mhz=self.ctx.clocks_mhz,
                idle_power_w=idle_power_w,
                micro_batches=self.config.micro_batches,
                simulated=self.ctx.agent_simulated,
                source=self._energy_source(),
            )
            lows = ", ".join(f"s{s['stage']}: {s['f_low_mhz']}" for s in profile["stages"])
            self._done("profiling", f"f_low {lows} MHz")
        self.phases.append(
            {
                "name": "profiling",
                "clocks_mhz": candidates,
                "iterations_per_clock": 2 * n,
                "points": [{"clock_mhz": c, **w.to_dict()} for c, w in points],
            }
        )
        return profile

    def plan(self, profile: dict[str, Any] | None) -> Any:
        """Rank 0 picks the schedule and the initial clocks from the profile; every rank switches to them."""
        from envpipe.schedules import get_schedule
        from envpipe.train.planning import initial_plan

        costs, decision = None, None
        if self.ctx.is_rank0:
            costs, schedule, clocks = initial_plan(profile, self.config)
            decision = (schedule.name, list(schedule.r), clocks)
        name, r, clocks = _broadcast(decision)
        self.planned = clocks is not None  # False without a profile: every rank must know (lockstep)
        schedule = get_schedule(
            name, self.config.stages, self.config.micro_batches, r=r if name == "ours" else None
        )
        # No plan (type baseline): every unit at the top clock, so the agent still sees every unit run.
        self._set(schedule, clocks or top_clock_plan(schedule, self.ctx.max_clock_mhz))
        return costs

    def reconfigure(self, costs: Any) -> None:
        """Measure, let rank 0's Reconfigurer update the plan and broadcast it, until it returns None.

        None means stable, or the policy's round cap reached.
        """
        from envpipe.planner import DEFAULT_MAX_ROUNDS

        policy = self.config.reconfig
        cap = self.config.reconfig_max_rounds
        cap = DEFAULT_MAX_ROUNDS.get(policy, 0) if cap is None else cap
        record: dict[str, Any] = {"name": "reconfiguration", "policy": policy, "max_rounds": cap}
        if not self.planned:  # no profile (the agent did not answer): nothing to plan with
            self.phases.append({**record, "rounds": 0, "changes": 0, "skipped": "no profile"})
            return
        if policy == "default" or cap == 0:
            self.phases.append({**record, "rounds": 0, "changes": 0})
            return
        from envpipe.train.planning import make_reconfigurer

        baseline_ms = self._fresh_baseline_ms()
        reconfigurer = None
        if self.ctx.is_rank0:
            reconfigurer = make_reconfigurer(
                self.schedule, costs, self.config, max_rounds=cap, baseline_ms=baseline_ms
            )
        self._start("reconfiguration", f"reconfiguration ({policy})", cap)
        changes, rounds = 0, 0
        # At its cap the Reconfigurer may send one last plan (the top clocks) before None: cap + 2 bounds it.
        for rounds in range(1, cap + 2):
            loss, timeline = self._sample_timeline(RECONFIG_SAMPLES)
            new = _broadcast(reconfigurer.update(self.clocks, timeline) if reconfigurer is not None else None)
            if self.ctx.is_rank0:
                emit(
                    "advance",
                    phase="reconfiguration",
                    completed=min(rounds, cap),
                    info=f"loss {loss:.3f} · {changes + (new is not None)} plan changes",
                )
            if new is None:
                break
            changes += 1
            self._set(self.schedule, new)
        self._done(
            "reconfiguration",
            f"done after {rounds} rounds, {changes} plan changes",
            completed=rounds,
            total=rounds,
        )
        if reconfigurer is not None:
            record.update(
                target_ms=reconfigurer.target_ms,
                baseline_ms=reconfigurer.baseline_ms,
                bound_reachable=reconfigurer.bound_reachable,
            )
        self.phases.append({**record, "rounds": rounds, "changes": changes})

    def _fresh_baseline_ms(self) -> float:
        """The baseline's iteration time (1F1B, top clocks, planner's frame) measured right now.

        The Reconfigurer's target is this times (1 + bound), and it calibrates the plan's speed from its
        first sample, taken next: the start's baseline window, measured before profiling, let a change of
        the machine's load in between move the target (on 2 shared cores: a 277 ms baseline, a target
        extrapolated from the first sample of 423 ms, the bound declared unreachable).
        """
        plan = (self.schedule, self.clocks)
        self._set(self._one_f_one_b, top_clock_plan(self._one_f_one_b, self.ctx.max_clock_mhz))
        self.ctx.engine.train_batch(self.ctx.data_iter)  # settle after the switch
        _, timeline = self._sample_timeline(RECONFIG_SAMPLES)
        self._set(*plan)
        self.ctx.engine.train_batch(self.ctx.data_iter)
        return _span_iteration_ms(timeline)

    def _sample_timeline(self, iterations: int) -> tuple[float, list[Any]]:
        """Run ``iterations`` of the current plan; the last loss and their per-unit median timeline.

        One iteration of 1-2 ms CPU units is a noisy sample (a descheduled rank stretches a unit several
        times over), and the Reconfigurer calibrates its target from its first sample: a median of a few
        keeps one bad iteration from setting the target or moving a clock.
        """
        engine, records, loss = self.ctx.engine, [], 0.0
        for _ in range(iterations):
            loss = float(engine.train_batch(self.ctx.data_iter))
            records.append(engine.timeline_record())
        return loss, _median_timeline(engine.gather_timelines(records))

    def steady(self, baseline: Window) -> tuple[Window, Window, list[Any]]:
        """Run the final schedule and clocks for ``--steps`` iterations, interleaved with baseline windows.

        ``compare_rounds`` rounds each run a baseline window (1F1B, top clock) and a window of the final
        plan side by side, in alternating order (base-final, final-base, ...), so that drift (a busy
        neighbour, temperature) hits both sides alike. Each round gives one paired saving; the round with
        the median saving represents the run (its two windows). Medians of each side taken separately let
        a burst of load in one window decide the sign; the start's baseline window, measured before
        profiling, is not paired. Without rounds the start's window is the baseline.

        Returns:
            The baseline's and the final plan's representative windows, and the last iteration's spans.
        """
        steps = self.config.steps
        # Also when the plan is the baseline's (type baseline): the "saving" then shows the noise floor.
        rounds = min(self.config.compare_rounds, steps)
        final = (self.schedule, self.clocks)
        reference = (self._one_f_one_b, top_clock_plan(self._one_f_one_b, self.ctx.max_clock_mhz))
        parts = max(rounds, 1)  # --steps split as evenly as possible over the rounds
        n_finals = [self.window_iterations(steps // parts + (k < steps % parts)) for k in range(parts)]
        total = sum(n_finals) * (2 if rounds else 1)
        self._start("steady", f"steady ({self.config.type}, {self.schedule.name})", total)
        base_windows, final_windows, done = [], [], 0
        for k, n in enumerate(n_finals):
            # Both sides of a round get the same iterations: a window's fixed costs (marks, barriers) per
            # iteration then weigh alike, where 5 baseline vs 10 plan iterations favoured the plan by ~10 %.
            sides = ["final", "baseline"] if k % 2 else ["baseline", "final"]
            for side in sides if rounds else ["final"]:
                self._set(*(reference if side == "baseline" else final))
                info = "baseline · " if side == "baseline" else ""
                # Spans on both sides: the two sides of a pair run exactly the same code.
                window = self.measure(
                    "steady", n, info=info, offset=done, total=total, spans=True, settle=True
                )
                if side == "final":
                    final_windows.append(window)
                    timeline = self.last_timeline  # the final plan's last measured iteration
                else:
                    base_windows.append(window)
                done += n
        self._set(*final)
        pairs = (
            list(zip(base_windows, final_windows)) if rounds else [(baseline, _median_window(final_windows))]
        )
        base, steady = _median_pair(pairs)
        self._done("steady", f"{steady.iteration_ms:.0f} ms/it · {_joules(steady)}")
        self.phases.append(
            {
                "name": "steady",
                "schedule": self.schedule.name,
                "compare_rounds": rounds,
                **steady.to_dict(),
                "windows": [_window_brief(w) for w in final_windows],
                "baseline_windows": [_window_brief(w) for w in base_windows],
                "paired_savings": [_pair_saving(b, f) for b, f in pairs],
            }
        )
        return base, steady, timeline

    # -- helpers --------------------------------------------------------------------------------------

    def _set(self, schedule: Any, clocks: dict[int, dict[str, int]]) -> None:
        if schedule is not self.schedule:
            self.ctx.engine.set_schedule(schedule)
            self.schedule = schedule
        self.ctx.engine.set_clocks(clocks)
        self.clocks = clocks

    def _start(self, phase: str, label: str, total: int) -> None:
        if self.ctx.is_rank0:
            emit("phase", phase=phase, label=label, total=total)

    def _done(self, phase: str, info: str, **fields: Any) -> None:
        if self.ctx.is_rank0:
            emit("phase_done", phase=phase, info=info, **fields)

    def _sim_card(self) -> Any:
        """The sim agent's card (busy/idle power) and DVFS model, for the span-based diagnostic; else None."""
        if not self.ctx.agent_simulated:
            return None
        from envpipe_agent.dvfs import CARDS, get_model

        name = self.ctx.gpu_name.lower()
        cards = [c for c in CARDS.values() if c.name.lower() in name or name.startswith(c.name.lower())]
        return (cards[0], get_model(self.config.dvfs_model)) if cards else None

    def _energy_source(self) -> str:
        if self.ctx.agent_simulated:
            return f"sim agent (simulated), {self.config.dvfs_model} DVFS model"
        return "agent energy counter (NVML)"


def run_phases(ctx: RankContext) -> dict[str, Any] | None:
    """Run every phase; rank 0 returns the result dict (see :mod:`envpipe.train.report`), others ``None``."""
    runner = PhaseRunner(ctx)
    runner.warm_up()
    if ctx.config.mode == "profile":
        profile = runner.profiling()
        return {"profile": profile} if ctx.is_rank0 else None
    baseline = runner.baseline()
    profile = None
    if ctx.config.type != "baseline":
        profile = runner.profiling()
        costs = runner.plan(profile)
        runner.reconfigure(costs)
    elif ctx.config.scheduling != "1f1b":
        runner.plan(None)
    baseline, steady, timeline = runner.steady(baseline)
    if not ctx.is_rank0:
        return None
    return {
        "simulated": ctx.agent_simulated and steady.simulated,
        "energy_source": runner._energy_source(),
        "gpu": {"name": ctx.gpu_name, "clocks_mhz": list(ctx.clocks_mhz)},
        "world_size": ctx.world_size,
        "dp_size": ctx.dp_size,
        "schedule": {
            "name": runner.schedule.name,
            "r": _r_list(runner.schedule),
            "text": runner.schedule.render(),
        },
        "clocks": {str(s): units for s, units in runner.clocks.items()},
        "phases": runner.phases,
        "energy_unavailable_windows": runner.unavailable_windows,
        "profile": profile,
        "baseline": baseline.to_dict(),
        "steady": steady.to_dict(),
        "last_iteration": [_span_dict(span) for span in timeline],
    }


def _pair_saving(base: Window, final: Window) -> float | None:
    """1 - final / baseline energy per iteration of one round; None without energy on either side."""
    if base.energy_j is None or final.energy_j is None or base.energy_j <= 0:
        return None
    return 1.0 - final.energy_j / base.energy_j


def _median_pair(pairs: list[tuple[Window, Window]]) -> tuple[Window, Window]:
    """The round with the median paired saving (the lower middle one of an even count: conservative).

    Rounds without energy are left out; if none has energy, the last round. The chosen windows' statistic
    says how they were picked.
    """
    known = sorted((p for p in pairs if _pair_saving(*p) is not None), key=lambda p: _pair_saving(*p))
    if not known:
        return pairs[-1]
    base, final = known[(len(known) - 1) // 2]
    how = f"round with the median of {len(known)} paired savings (baseline and plan windows side by side)"
    return replace(base, statistic=how), replace(final, statistic=how)


def _merge_windows(windows: list[Window]) -> Window:
    """Several windows of one configuration as one: energy and times averaged by iterations."""
    if len(windows) == 1:
        return windows[0]
    total = sum(w.iterations for w in windows)

    def mean(values: list[float | None], weights: list[int]) -> float | None:
        if any(v is None for v in values):
            known = [(v, n) for v, n in zip(values, weights) if v is not None]
            return sum(v * n for v, n in known) / sum(n for _, n in known) if known else None
        return sum(v * n for v, n in zip(values, weights)) / sum(weights)

    weights = [w.iterations for w in windows]
    stages = windows[0].stage_energy_j
    units = windows[0].stage_unit_ms
    return Window(
        iterations=total,
        statistic=f"mean over {len(windows)} energy windows",
        iteration_ms=mean([w.iteration_ms for w in windows], weights),
        iteration_ms_median=mean([w.iteration_ms_median for w in windows], weights),
        stage_energy_j={s: mean([w.stage_energy_j.get(s) for w in windows], weights) for s in stages},
        simulated=all(w.simulated for w in windows),
        losses=[x for w in windows for x in w.losses],
        stage_unit_ms={
            s: {k: mean([w.stage_unit_ms[s][k] for w in windows], weights) for k in units[s]} for s in units
        },
        span_iteration_ms=windows[0].span_iteration_ms,
        span_energy_j={
            s: mean([w.span_energy_j.get(s) for w in windows], weights) for s in windows[0].span_energy_j
        },
    )


def _median_timeline(timelines: list[list[Any]]) -> list[Any]:
    """Per (stage, unit): the median start and the median end over several iterations' timelines.

    Each iteration's end follows its start, so the order statistics do too: the result is a valid timeline.
    """
    from envpipe.sim import UnitSpan

    if len(timelines) == 1:
        return timelines[0]
    by_unit: dict[tuple[int, str], list[Any]] = {}
    for timeline in timelines:
        for span in timeline:
            by_unit.setdefault((span.stage, str(span.unit)), []).append(span)
    return [
        UnitSpan(
            stage,
            unit,
            statistics.median(s.start_ms for s in spans),
            statistics.median(s.end_ms for s in spans),
            spans[-1].clock_mhz,
        )
        for (stage, unit), spans in sorted(by_unit.items(), key=lambda kv: kv[1][0].start_ms)
    ]


def _median_window(windows: list[Window]) -> Window:
    """The window with the median energy per iteration (the lower middle one of an even count).

    Windows without energy (agent unavailable) are left out; if none has energy, the last window.
    """
    ordered = sorted((w for w in windows if w.energy_j is not None), key=lambda w: w.energy_j)
    return ordered[(len(ordered) - 1) // 2] if ordered else windows[-1]


def _joules(window: Window) -> str:
    return "energy unavailable" if window.energy_j is None else f"{window.energy_j:.2f} J/it"


def _window_brief(window: Window) -> dict[str, float]:
    return {"iterations": window.iterations, "iteration_ms": window.iteration_ms, "energy_j": window.energy_j}


def _r_list(schedule: Any) -> list[int] | None:
    r = getattr(schedule, "r", None)
    return None if r is None else list(r)


def _span_dict(span: Any) -> dict[str, Any]:
    return {
        "stage": span.stage,
        "unit": str(span.unit),
        "start_ms": span.start_ms,
        "end_ms": span.end_ms,
        "clock_mhz": span.clock_mhz,
    }


def _span_iteration_ms(spans: list[Any]) -> float:
    """First unit start to last unit end over every stage (the planner's iteration time)."""
    return max(s.end_ms for s in spans) - min(s.start_ms for s in spans)


def _collect_unit_ms(spans: list[Any], into: dict[str, list[float]]) -> None:
    """Mean forward and backward unit time of one iteration on this stage."""
    for kind in ("F", "B"):
        durations = [s.end_ms - s.start_ms for s in spans if str(s.unit).startswith(kind)]
        if durations:
            into[kind].append(statistics.fmean(durations))


class _BusyTally:
    """Busy time and modelled busy energy of this rank's units (the sim agent's power model, rank clock)."""

    def __init__(self, card_model: Any) -> None:
        self.card = card_model
        self.busy_s = 0.0
        self.busy_j = 0.0

    def add(self, spans: list[Any]) -> None:
        if self.card is None:
            return
        card, model = self.card
        for span in spans:
            seconds = (span.end_ms - span.start_ms) / 1e3
            x = (span.clock_mhz or card.max_clock_mhz) / card.max_clock_mhz
            self.busy_s += seconds
            self.busy_j += seconds * card.busy_power_w * model.power_ratio(x)

    def energy_j(self, window_s: float) -> float:
        """Energy of a window of ``window_s`` seconds: the busy units plus idle power for the rest."""
        card, _ = self.card
        return self.busy_j + card.idle_power_w * max(window_s - self.busy_s, 0.0)


def _sum_by_stage(gathered: list[tuple]) -> dict[int, float | None]:
    """Energy per stage over its replicas; None when any replica's window had no energy."""
    out: dict[int, float | None] = {}
    for stage, energy_j, *_ in gathered:
        known = out.get(stage, 0.0)
        out[stage] = None if energy_j is None or known is None else known + energy_j
    return dict(sorted(out.items()))


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
