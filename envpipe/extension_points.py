"""Every extension point's registry in one place, and the docs tables derived from them.

``python -m envpipe.extension_points`` prints docs/registries.md (tests/test_extension_points.py checks that
the committed file is current). Registries: schedules, clock types, planner policies, p2p transports (this
package); DVFS models and cards (``envpipe_agent.dvfs``) and agent backends (``envpipe_agent.backend``): the
agent sits below the library.
"""

from __future__ import annotations

import sys

from envpipe_agent.backend import BACKENDS
from envpipe_agent.dvfs import CARDS, MODELS

from envpipe.clock_types import CLOCK_TYPES
from envpipe.planner import POLICIES
from envpipe.registry import markdown_table
from envpipe.schedules import SCHEDULES
from envpipe.transports import TRANSPORTS


def docs() -> str:
    """docs/registries.md: one table per registry, with the flag and the module that owns it."""
    yes = {True: "yes", False: "no"}
    parts = [
        "# Registries (generated: `python -m envpipe.extension_points > docs/registries.md`)",
        "",
        "Every list of choices in the CLI, the config validation and these tables come from one registry "
        "each; docs/architecture.md, \"Adding a schedule, a policy, a backend\", shows how to add an entry.",
        "",
        "## Schedules: `--scheduling` (`envpipe.schedules.SCHEDULES`)",
        "",
        SCHEDULES.table(
            {
                "stages per rank": lambda s: f"{s.virtual_stages}{'+' if s.any_virtual_stages else ''}",
                "takes r": lambda s: yes[s.takes_r],
                "`envpipe train` (DeepSpeed)": lambda s: yes[s.runs_on_deepspeed],
            }
        ),
        "",
        "## Clock types: `--type` (`envpipe.clock_types.CLOCK_TYPES`)",
        "",
        CLOCK_TYPES.table(),
        "",
        "## Reconfiguration policies: `--reconfig` (`envpipe.planner.POLICIES`)",
        "",
        POLICIES.table({"default round cap": lambda p: str(p.max_rounds) if p.max_rounds else "-"}),
        "",
        "## p2p transports: `--p2p-transport` (`envpipe.transports.TRANSPORTS`)",
        "",
        TRANSPORTS.table(),
        "",
        "## DVFS models: `--dvfs-model` (`envpipe_agent.dvfs.MODELS`)",
        "",
        markdown_table(
            ["name", "a", "p0", "g", "idle", "source"],
            [
                [f"`{m.name}`", f"{m.a}", f"{m.p0}", f"{m.g}", f"{m.idle_fraction}", m.source]
                for m in MODELS.values()
            ],
        ),
        "",
        "## Cards: `--card` (`envpipe_agent.dvfs.CARDS`)",
        "",
        markdown_table(
            ["name", "card", "clocks (MHz)", "busy / idle power (W)", "source"],
            [
                [
                    f"`{key}`",
                    c.name,
                    f"{min(c.clocks_mhz)}-{max(c.clocks_mhz)} ({len(c.clocks_mhz)})",
                    f"{c.busy_power_w:g} / {c.idle_power_w:g}",
                    c.source,
                ]
                for key, c in CARDS.items()
            ],
        ),
        "",
        "## Agent backends: `envpipe-agent --backend` (`envpipe_agent.backend.BACKENDS`)",
        "",
        markdown_table(
            ["name", "summary", "factory"],
            [[f"`{name}`", entry.description, f"`{entry.factory}`"] for name, entry in BACKENDS.items()],
        ),
        "",
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.stdout.write(docs())
