"""The plan file: the schedule and its r, a clock per unit, the target iteration time and the measured
profile, written with a fingerprint of what it was made for, so that a later run can reuse it and skip
profiling (``envpipe train --plan FILE``, the ``"envpipe"`` block's ``plan``).

A plan is valid only for the run it was measured on: any fingerprint field that differs is refused with one
error naming that field (a plan for another card or another model would run the wrong clocks).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from envpipe.errors import ConfigError

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
) -> dict[str, Any]:
    """The plan file's JSON object."""
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
    }


def write_plan(plan: dict[str, Any], path: str | Path) -> None:
    """Write the plan atomically (an existing file is replaced only by a complete one)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(plan, out, indent=1)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    return plan


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
