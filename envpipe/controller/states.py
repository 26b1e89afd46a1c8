"""The controller's first states: warm-up, baseline window, energy-valley profiling."""

from __future__ import annotations

import statistics
import time
from typing import Any

from envpipe.controller.core import Context, Program, measure
from envpipe.controller.windows import Window, merge_windows


def warm_up(ctx: Context) -> Program:
    """Unmeasured steps (first-touch allocations, connections); the last one estimates a step's time."""
    ctx.use_baseline()
    n = ctx.config.warmup_steps
    ctx.enter("warm-up", "warm-up (1f1b, top clock)", n)
    elapsed_ms = 0.0
    for i in range(n):
        result = yield
        elapsed_ms = result.wall_ms
        ctx.emit("advance", phase="warm-up", completed=i + 1, info=f"{elapsed_ms:.0f} ms/it")
    ctx.iteration_s = ctx.comm.broadcast(elapsed_ms / 1e3)
    ctx.done("warm-up", f"{elapsed_ms:.0f} ms/it")


def window_steps(ctx: Context, requested: int) -> int:
    """Enough steps for a real agent's energy window (>= min_window_s); the sim agent is exact."""
    from envpipe.profiling import iterations_per_clock

    if ctx.simulated or ctx.iteration_s <= 0:
        return requested
    return iterations_per_clock(requested, ctx.iteration_s * 1e3, min_window_s=ctx.config.min_window_s)


def baseline(
    ctx: Context,
    *,
    label: str = "baseline window (1f1b, top clock)",
    phase: str = "baseline",
    steps: int | None = None,
) -> Program:
    """1F1B with every unit at the top clock: the reference of the saving and of the plan's target."""
    ctx.use_baseline()
    n = window_steps(ctx, steps or ctx.config.baseline_steps)
    ctx.enter(phase, label, n)
    window = yield from measure(ctx, n, phase=phase, spans=True, total=n, settle=phase != "baseline")
    ctx.done(phase, f"{window.iteration_ms:.0f} ms/it · {joules(window)}")
    ctx.phases.append({"name": phase, "schedule": "1f1b", **window.to_dict()})
    return window


def profiling(ctx: Context) -> Program:
    """Every candidate clock on every stage for a few steps, down the clocks and back up: the energy valley.

    Returns (on rank 0) the profile JSON with monotone unit times, or None without energy.
    """
    from envpipe.profiling import candidate_clocks, profiling_cost

    config = ctx.config
    top = ctx.gpu.max_clock_mhz
    candidates = candidate_clocks(
        ctx.gpu.clocks_mhz, count=config.profile_clocks, min_mhz=int(top * config.profile_min_ratio)
    )
    n = window_steps(ctx, config.profile_steps)
    idle_power_w = idle_power(ctx)
    if ctx.iteration_s > 0:
        cost = profiling_cost(
            candidates,
            2 * n,
            ctx.iteration_s * 1e3,
            warmup_iterations=2,  # one settling step before each of the clock's two windows (down, up)
            min_window_s=0.0 if ctx.simulated else config.min_window_s,
        )
        ctx.emit("message", text=f"profiling {', '.join(map(str, candidates))} MHz: {cost.describe()}")
    # Down the clocks and back up: a drift (a busy neighbour, a warming cache) then hits every clock alike.
    order = candidates + candidates[::-1]
    ctx.enter("profiling", f"profiling ({len(candidates)} clocks)", n * len(order))
    windows: dict[int, list[Window]] = {}
    one_f_one_b = ctx.one_f_one_b()
    for k, clock_mhz in enumerate(order):
        ctx.use(one_f_one_b, ctx.top_clocks(one_f_one_b, clock_mhz))
        window = yield from measure(
            ctx,
            n,
            phase="profiling",
            info=f"{clock_mhz} MHz · ",
            offset=k * n,
            total=n * len(order),
            settle=True,
        )
        windows.setdefault(clock_mhz, []).append(window)
    ctx.phases.append(
        {
            "name": "profiling",
            "clocks_mhz": candidates,
            "iterations_per_clock": 2 * n,
            "points": [{"clock_mhz": c, **merge_windows(windows[c]).to_dict()} for c in candidates],
        }
    )
    if not ctx.is_rank0:
        return None
    measured = {c: ws for c, ws in windows.items() if all(w.energy_j is not None for w in ws)}
    if idle_power_w is None or not measured:
        ctx.done("profiling", "energy unavailable (agent did not answer): top clocks kept")
        return None
    profile = _build_profile(ctx, measured, idle_power_w)
    lows = ", ".join(f"s{s['stage']}: {s['f_low_mhz']}" for s in profile["stages"])
    ctx.done("profiling", f"f_low {lows} MHz")
    return profile


def idle_power(ctx: Context) -> float | None:
    """Mean power of an idle GPU (all ranks wait together, no step runs), for the profile's power split."""
    seconds = 0.2 if ctx.simulated else max(1.0, ctx.config.min_window_s)
    ctx.comm.barrier()
    window_id = ctx.meter.begin()
    time.sleep(seconds)
    energy = ctx.meter.end(window_id)
    power_w = None if energy is None else energy.energy_j / max(energy.duration_s, 1e-9)
    powers = [p for p in ctx.comm.all_gather(power_w) if p is not None]
    return statistics.fmean(powers) if powers else None


def _build_profile(ctx: Context, windows: dict[int, list[Window]], idle_power_w: float) -> dict[str, Any]:
    """The profile JSON from both passes' windows, repaired to monotone unit times (warned beyond noise)."""
    from envpipe.profile import ClockSample, build_profile
    from envpipe.profile_fit import repair_profile

    samples, spread = [], {}
    for clock_mhz, passes in windows.items():
        merged = merge_windows(passes)
        for stage, energy_j in merged.stage_energy_j.items():
            units = [w.stage_unit_ms[stage] for w in passes]
            samples.append(
                ClockSample(
                    stage=stage,
                    clock_mhz=int(clock_mhz),
                    fwd_ms=[u["F"] for u in units],
                    bwd_ms=[u["B"] for u in units],
                    iteration_ms=[w.iteration_ms_median for w in passes],
                    energy_j=energy_j * merged.iterations,
                    iterations=merged.iterations,
                )
            )
            spread[(stage, int(clock_mhz))] = {
                "fwd_ms": _range([u["F"] for u in units]),
                "bwd_ms": _range([u["B"] for u in units]),
                "iteration_ms": _range([w.iteration_ms_median for w in passes]),
            }
    raw = build_profile(
        samples,
        gpu_name=ctx.gpu.name,
        supported_mhz=ctx.gpu.clocks_mhz,
        idle_power_w=idle_power_w,
        micro_batches=ctx.micro_batches,
        simulated=ctx.simulated,
        source=energy_source(ctx),
    )
    profile, violations = repair_profile(raw, spread)
    for text in violations:
        ctx.warn(
            f"warning: {text}; the profile was repaired with a monotone fit (the raw points are kept in the "
            "report)"
        )
    return profile


def _range(values: list[float]) -> float:
    return max(values) - min(values)


def energy_source(ctx: Context) -> str:
    """Where the energy figures come from, in words."""
    if ctx.simulated:
        return f"sim agent (simulated), {ctx.config.dvfs_model} DVFS model"
    return "agent energy counter (NVML)"


def joules(window: Window) -> str:
    """A window's energy per step for progress lines."""
    return "energy unavailable" if window.energy_j is None else f"{window.energy_j:.2f} J/it"
