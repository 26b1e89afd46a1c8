"""The controller tests' fakes: the simulated pipeline of :mod:`envpipe.controller.simulated` and a
fingerprint helper."""

from __future__ import annotations

from typing import Any

from envpipe_agent.dvfs import get_card

from envpipe.controller.planfile import fingerprint
from envpipe.controller.simulated import run_pipeline as _run

CARD = get_card("h100")


def run_pipeline(config, steps, *, print_fingerprint=None, **options):
    """:func:`envpipe.controller.simulated.run_pipeline` with this file's default fingerprint."""
    stages, micro_batches = options.get("stages", 2), options.get("micro_batches", 4)
    return _run(
        config, steps, fingerprint=print_fingerprint or default_fingerprint(stages, micro_batches), **options
    )


def default_fingerprint(stages: int, micro_batches: int, **changes: Any) -> dict:
    fields = {
        "model": "sha256:fake",
        "stages": stages,
        "micro_batches": micro_batches,
        "micro_batch_size": 2,
        "seq_len": [64],
        "card": CARD.name,
        "clocks_mhz": list(CARD.clocks_mhz),
        "dvfs_model": "central",
        "envpipe_version": "0.1.0",
    }
    fields.update(changes)
    return fingerprint(**fields)
