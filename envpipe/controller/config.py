"""The controller's settings: the ``"envpipe"`` block of a DeepSpeed config, validated once.

The same block serves ``envpipe train`` (which also reads the run keys in :data:`RUN_KEYS`: model, stages,
steps, ...) and a user's own script through :func:`envpipe.deepspeed.initialize` (which ignores the run keys).
Keys may be spelt with ``-`` or ``_``. Choices come from their registries (clock types, schedules, planner
policies, DVFS models). No torch here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from envpipe.errors import ConfigError

# Keys of the block that only `envpipe train` reads (its TrainConfig fields beyond the controller's);
# the library accepts and ignores them, so one DeepSpeed JSON serves both. A test keeps this equal to
# TrainConfig's fields minus ControllerConfig's.
RUN_KEYS = frozenset(
    {
        "stages",
        "micro_batches",
        "micro_batch_size",
        "seq_len",
        "steps",
        "model",
        "data",
        "device",
        "num_gpus",
        "hostfile",
        "num_nodes",
        "report",
        "plot",
        "lr",
        "seed",
        "precision",
        "save_dir",
        "save_interval",
        "keep_last",
        "resume",
        "export_hf",
        "log_interval",
        "log_dir",
        "eval_data",
        "eval_interval",
        "eval_micro_batches",
        "grace_s",
        "start_step",
        "node_rank",
    }
)


@dataclass(frozen=True)
class ControllerConfig:
    """What the controller does during the first steps of a run and afterwards.

    Attributes:
        type: clock type of the first plan: ``baseline`` (no profiling, top clocks), ``uniform``,
            ``envelope``.
        scheduling: the schedule run at the plan (``1f1b`` or ``ours``); baseline windows always run 1F1B.
        reconfig: the planner policy of the reconfiguration state.
        warmup_steps: unmeasured steps first (allocations, connections).
        baseline_steps: steps of the baseline window (1F1B, top clock), the reference of every saving.
        profile_steps: steps per candidate clock and pass (profiling goes down the clocks and back up).
        profile_clocks: candidate clocks, spread from the top down to ``profile_min_ratio`` of it.
        profile_min_ratio: the lowest candidate clock as a share of the top clock.
        min_window_s: shortest energy window with a real agent (its counter moves every ~100 ms;
            docs/validation.md: 2.5 s windows erred by 7 % on an H100, 10 s windows by 0.4 %).
        reconfig_max_rounds: cap on reconfiguration rounds; ``None`` = the policy's own cap.
        slowdown_bound: allowed iteration-time slowdown against the baseline (0.01 = 1 %).
        dvfs_model: DVFS curve of the sim agent and of emulated DVFS.
        emulate_dvfs: stretch units by their clock's modelled slowdown; ``None`` = on with a sim agent.
        agent: the agent's control endpoint; ``None`` = ``$ENVPIPE_AGENT``, then the default sockets.
        plan: a plan file to reuse (skips profiling when its fingerprint matches this run).
        plan_out: where to write the plan once made (with its fingerprint).
        recheck_interval: at-plan steps between drift checks (0 = no drift guard).
        drift_checks: consecutive checks over the bound that trigger a re-plan.
        drift_threshold: a stage's unit time at the plan moving by more than this share re-plans at once.
        compare_rounds: paired rounds (a baseline window and a plan window side by side, alternating order)
            for the measured saving; 0 = none (production: no step at the baseline after planning).
        compare_steps: steps per side of a paired round.
        compare_every: run one paired round every this many at-plan steps; ``None`` = all rounds at the end
            of the run (needs ``max_steps``).
        max_steps: steps of the whole run when known (``envpipe train --steps``); places the rounds at
            the end.
        mode: ``train``, or ``profile`` (warm-up and profiling only, then the run stays at the top clock).

    """

    type: str = "envelope"
    scheduling: str = "ours"
    reconfig: str = "balanced"
    warmup_steps: int = 3
    baseline_steps: int = 5
    profile_steps: int = 2
    profile_clocks: int = 4
    profile_min_ratio: float = 0.5
    min_window_s: float = 10.0
    reconfig_max_rounds: int | None = None
    slowdown_bound: float = 0.01
    dvfs_model: str = "central"
    emulate_dvfs: bool | None = None
    agent: str | None = None
    plan: str | None = None
    plan_out: str | None = None
    recheck_interval: int = 500
    drift_checks: int = 3
    drift_threshold: float = 0.15
    compare_rounds: int = 0
    compare_steps: int = 5
    compare_every: int | None = None
    max_steps: int | None = None
    mode: str = "train"

    @classmethod
    def from_block(cls, block: dict[str, Any] | None, *, source: str = '"envpipe" block') -> ControllerConfig:
        """The config of a DeepSpeed ``"envpipe"`` block; run keys (:data:`RUN_KEYS`) are ignored.

        Raises:
            ConfigError: an unknown key or a bad value, naming it and ``source``.
        """
        values = {}
        for key, value in (block or {}).items():
            name = str(key).replace("-", "_")
            if name in RUN_KEYS:
                continue
            if name not in CONTROLLER_KEYS:
                valid = ", ".join(sorted(CONTROLLER_KEYS | RUN_KEYS))
                raise ConfigError(f'{source}: unknown key "{key}"; valid keys: {valid}')
            values[name] = value
        config = cls(**values)
        config.validate(source)
        return config

    def validate(self, source: str | None = "envpipe config", name_of: Any = str) -> None:
        """Raise ``ConfigError`` naming the first bad value (as ``name_of(field)``: its flag) and the fix."""
        at = f"{source}: " if source else ""
        check_fields(
            self, lambda name: at + name_of(name), choices=choices_by_key(), int_min=_INT_MIN,
            optional=_OPTIONAL, float_range=_FLOAT_RANGE,
        )
        if self.emulate_dvfs not in (None, True, False):
            raise ConfigError(
                f"{at}{name_of('emulate_dvfs')} must be true or false, got {self.emulate_dvfs!r}"
            )
        for name in ("agent", "plan", "plan_out"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{at}{name_of(name)} must be a string (a path or endpoint), got {value!r}")
        if self.compare_every is not None and not self.compare_rounds:
            raise ConfigError(
                f"{at}{name_of('compare_every')} = {self.compare_every} spreads paired rounds, but none are "
                f"asked for; set {name_of('compare_rounds')} (paired rounds are opt-in) or drop it"
            )
        if self.compare_rounds and self.compare_every is None and self.max_steps is None:
            raise ConfigError(
                f"{at}{name_of('compare_rounds')} = {self.compare_rounds} needs compare_every (one round "
                "every K at-plan steps) when the run's length is not known; set compare_every"
            )

    def compare_tail_steps(self) -> int:
        """Steps the paired rounds take at the end of the run (0: every K steps, or none)."""
        if not self.compare_rounds or self.compare_every is not None:
            return 0
        return self.compare_rounds * 2 * (1 + self.compare_steps)


CONTROLLER_KEYS = frozenset(f.name for f in dataclasses.fields(ControllerConfig))

_OPTIONAL = {"reconfig_max_rounds", "compare_every", "max_steps"}
_INT_MIN = {
    "warmup_steps": 1,
    "baseline_steps": 1,
    "profile_steps": 1,
    "profile_clocks": 1,
    "reconfig_max_rounds": 0,
    "recheck_interval": 0,
    "drift_checks": 1,
    "compare_rounds": 0,
    "compare_steps": 1,
    "compare_every": 1,
    "max_steps": 1,
}
_FLOAT_RANGE = {
    "profile_min_ratio": (0.05, 1.0),
    "min_window_s": (0.0, 3600.0),
    "slowdown_bound": (0.0, 1.0),
    "drift_threshold": (0.01, 10.0),
}


def check_fields(
    obj: Any,
    name_of: Any,
    *,
    choices: dict[str, tuple[str, ...]],
    int_min: dict[str, int],
    optional: set[str] | frozenset[str] = frozenset(),
    float_range: dict[str, tuple[float, float]] | None = None,
) -> None:
    """Raise ``ConfigError`` for the first field of ``obj`` outside its choices, integer minimum or number
    range, naming it as ``name_of(field)`` (its flag or config key); a field in ``optional`` may be None."""
    for name, allowed in choices.items():
        value = getattr(obj, name)
        if value not in allowed:
            raise ConfigError(f"{name_of(name)} = {value!r} is not one of {', '.join(allowed)}; pick one")
    for name, low in int_min.items():
        value = getattr(obj, name)
        if value is None and name in optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name_of(name)} must be an integer >= {low}, got {value!r}")
    for name, (low, high) in (float_range or {}).items():
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ConfigError(f"{name_of(name)} must be a number in [{low}, {high}], got {value!r}")


def choices_by_key() -> dict[str, tuple[str, ...]]:
    """The allowed values of each choice key, read from the registries that define them."""
    from envpipe_agent.dvfs import MODELS

    from envpipe.clock_types import CLOCK_TYPES
    from envpipe.planner import POLICIES
    from envpipe.schedules import trainable

    return {
        "type": tuple(CLOCK_TYPES),
        "scheduling": trainable(),  # the schedules DeepSpeed's engine runs
        "reconfig": tuple(POLICIES),
        "dvfs_model": tuple(MODELS),
        "mode": ("train", "profile"),
    }
