"""The plan file: the schedule and its r, a clock per unit, the target iteration time and the measured
profile, written with a fingerprint of what it was made for, so that a later run can reuse it and skip
profiling (``envpipe train --plan FILE``, the ``"envpipe"`` block's ``plan``).

A plan is valid only for the run it was measured on: any fingerprint field that differs is refused with one
error naming that field (a plan for another card or another model would run the wrong clocks).

The plan also carries the baseline window it was planned against (``"baseline"``: iteration time, energy per
iteration per stage and in total, tokens/s, steps, simulated or measured, world size, date), so that a run
reusing the plan needs no baseline window of its own: its saving is then reported against that stored
baseline, labelled :data:`STORED_BASELINE_LABEL`. It is not part of the fingerprint; a plan file without it
(written before) still works, and the reusing run measures a baseline window as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from envpipe.controller.windows import Window
from envpipe.errors import ConfigError
from envpipe.files import write_json_atomic

PLAN_FORMAT = "envpipe-plan/1"
# The fingerprint's fields, in the order they are compared (the first that differs is named).
FINGERPRINT_FIELDS = (
    "model",
    "stages",
    "micro_batches",
    "micro_batch_size",
    "seq_len",
    "card",
    "clocks_mhz",
    "dvfs_model",
    "envpipe_version",
)
STORED_BASELINE_LABEL = "baseline from the plan file (an earlier run; unpaired)"
# The stored baseline's fields that a reusing run needs (the others are for people reading the file).
_BASELINE_NUMBERS = ("iterations", "iteration_ms", "iteration_ms_median")


def fingerprint(**fields: Any) -> dict[str, Any]:
    """A fingerprint with exactly :data:`FINGERPRINT_FIELDS` (a missing field is a programming error)."""
    missing = [name for name in FINGERPRINT_FIELDS if name not in fields]
    if missing or set(fields) - set(FINGERPRINT_FIELDS):
        raise ValueError(
            f"fingerprint fields: missing {missing}, unknown {sorted(set(fields) - set(FINGERPRINT_FIELDS))}"
        )
    return {name: _jsonable(fields[name]) for name in FINGERPRINT_FIELDS}


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_fingerprint(plan: dict[str, Any], current: dict[str, Any], *, source: str) -> None:
    """Raise ``ConfigError`` naming the first fingerprint field in which ``plan`` differs from this run.

    ``current`` may hold only some fields (``envpipe train`` checks what it knows before starting ranks).
    """
    theirs = plan.get("fingerprint") or {}
    for name in FINGERPRINT_FIELDS:
        if name not in current:
            continue
        if name not in theirs:
            raise ConfigError(
                f"{source}: the plan's fingerprint has no {name!r}; make a new plan (drop the plan)"
            )
        if _jsonable(theirs[name]) != _jsonable(current[name]):
            raise ConfigError(
                f"{source}: the plan was made for {name} = {_short(theirs[name])}, this run has "
                f"{name} = {_short(current[name])}; make a new plan (drop the plan option) or run with the "
                f"plan's {name}"
            )


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def plan_dict(
    *,
    fingerprint: dict[str, Any],
    schedule: Any,
    clocks: dict[int, dict[str, int]],
    target_ms: float | None,
    baseline_ms: float | None,
    settings: dict[str, Any],
    profile: dict[str, Any] | None,
    simulated: bool,
    baseline: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The plan file's JSON object; ``baseline`` is the stored baseline window (see the module docstring)."""
    r = getattr(schedule, "r", None)
    return {
        "format": PLAN_FORMAT,
        "simulated": bool(simulated),
        "fingerprint": fingerprint,
        "schedule": {"name": schedule.name, "r": None if r is None else list(r)},
        "clocks": {str(s): dict(units) for s, units in clocks.items()},
        "target_ms": target_ms,
        "baseline_ms": baseline_ms,
        "settings": settings,
        "profile": profile,
        "baseline": baseline,
    }


def baseline_record(
    window: Window, *, fingerprint: dict[str, Any], world_size: int, date: str
) -> dict[str, Any]:
    """A baseline window as the plan file stores it (tokens/s only where the input is token sequences)."""
    seq_len = fingerprint.get("seq_len")
    tokens_per_s = None
    if isinstance(seq_len, list) and len(seq_len) == 1 and window.iteration_ms > 0:
        replicas = max(1, world_size // int(fingerprint["stages"]))
        tokens = fingerprint["micro_batches"] * fingerprint["micro_batch_size"] * seq_len[0] * replicas
        tokens_per_s = tokens / (window.iteration_ms / 1e3)
    return {
        "iterations": window.iterations,
        "iteration_ms": window.iteration_ms,
        "iteration_ms_median": window.iteration_ms_median,
        "span_iteration_ms": window.span_iteration_ms,
        "stage_energy_j": {str(s): e for s, e in window.stage_energy_j.items()},
        "energy_j": window.energy_j,
        "tokens_per_s": tokens_per_s,
        "simulated": window.simulated,
        "world_size": world_size,
        "date": date,
        "statistic": window.statistic,
    }


def stored_window(record: dict[str, Any]) -> Window:
    """The plan file's stored baseline (checked by :func:`read_plan`) as a Window, labelled as such."""
    return Window(
        iterations=int(record["iterations"]),
        iteration_ms=float(record["iteration_ms"]),
        iteration_ms_median=float(record["iteration_ms_median"]),
        stage_energy_j={
            int(s): e for s, e in sorted(record["stage_energy_j"].items(), key=lambda kv: int(kv[0]))
        },
        simulated=record["simulated"],
        losses=[],
        span_iteration_ms=record.get("span_iteration_ms"),
        statistic=f"{STORED_BASELINE_LABEL}: {record.get('statistic', '')}, measured {record.get('date')}",
    )


def write_plan(plan: dict[str, Any], path: str | Path) -> None:
    """Write the plan atomically (an existing file is replaced only by a complete one)."""
    write_json_atomic(plan, path, indent=1)


def read_plan(path: str | Path, *, source: str) -> dict[str, Any]:
    """Read and check the format of a plan file.

    Raises:
        ConfigError: no such file, not JSON, or not a plan file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{source} {path}: no such file; give a plan written by an earlier run (plan_out)")
    try:
        plan = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source} {path}: not valid JSON ({exc}); give a plan file") from None
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise ConfigError(f"{source} {path}: not a plan file (format {PLAN_FORMAT!r} expected)")
    for key in ("fingerprint", "schedule", "clocks"):
        if not isinstance(plan.get(key), dict):
            raise ConfigError(f"{source} {path}: the plan has no {key!r} object; make a new plan")
    problem = _baseline_problem(plan.get("baseline"))
    if problem:
        raise ConfigError(
            f'{source} {path}: the plan\'s stored baseline is malformed ({problem}); delete its "baseline" '
            "key (the run then measures a baseline window) or make a new plan"
        )
    return plan


def _baseline_problem(baseline: Any) -> str | None:
    """What is wrong with a plan's stored baseline (None: absent, or usable)."""
    if baseline is None:
        return None
    if not isinstance(baseline, dict):
        return "not an object"
    for name in _BASELINE_NUMBERS:
        value = baseline.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            return f"{name} = {_short(value)}, a positive number expected"
    energy = baseline.get("stage_energy_j")
    if not isinstance(energy, dict) or not energy:
        return "stage_energy_j: an object of energy per stage expected"
    for stage, joules in energy.items():
        if not str(stage).isdigit() or not (joules is None or isinstance(joules, (int, float))):
            return f"stage_energy_j[{stage!r}] = {_short(joules)}: joules (or null) per stage number expected"
    if not isinstance(baseline.get("simulated"), bool) or not isinstance(baseline.get("world_size"), int):
        return "simulated (true/false) and world_size (an integer) expected"
    return None


def schedule_and_clocks(
    plan: dict[str, Any], stages: int, micro_batches: int
) -> tuple[Any, dict[int, dict[str, int]]]:
    """The plan's schedule (rebuilt from its name and r) and its clocks keyed by stage number."""
    from envpipe.schedules import get_schedule

    spec = plan["schedule"]
    r = spec.get("r") if spec.get("name") != "1f1b" else None
    schedule = get_schedule(spec["name"], stages, micro_batches, r=r)
    clocks = {int(s): {str(u): int(c) for u, c in units.items()} for s, units in plan["clocks"].items()}
    return schedule, clocks
