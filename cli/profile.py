"""``envpipe profile``: run only the profiling phase of a training run and write the profile JSON.

The profile (docs/architecture.md, "Profile JSON") holds each stage's forward/backward time and energy per
iteration at every candidate clock; ``envpipe simulate --profile`` and the planner read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from envpipe_cli._errors import user_errors
from envpipe_cli.train import (
    AgentOpt,
    DataOpt,
    DeepspeedConfigOpt,
    DeviceOpt,
    DvfsModelOpt,
    EmulateDvfsOpt,
    HostfileOpt,
    MicroBatchesOpt,
    MicroBatchSizeOpt,
    ModelOpt,
    NumGpusOpt,
    NumNodesOpt,
    SeqLenOpt,
    StagesOpt,
    collect_flags,
    resolve_flags,
)


def profile(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the profile JSON.")] = Path(
        "envpipe-profile.json"
    ),
    stages: StagesOpt = None,
    micro_batches: MicroBatchesOpt = None,
    micro_batch_size: MicroBatchSizeOpt = None,
    seq_len: SeqLenOpt = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    deepspeed_config: DeepspeedConfigOpt = None,
    agent: AgentOpt = None,
    dvfs_model: DvfsModelOpt = None,
    emulate_dvfs: EmulateDvfsOpt = None,
    device: DeviceOpt = None,
    num_gpus: NumGpusOpt = None,
    hostfile: HostfileOpt = None,
    num_nodes: NumNodesOpt = None,
) -> None:
    """Profile every stage at each candidate clock (1F1B, a few iterations each); write the profile JSON."""
    flags = collect_flags({k: v for k, v in locals().items() if k != "output"})  # first: only the options
    from rich.console import Console

    from envpipe.train.launch import profile as run_profile

    with user_errors():
        config = resolve_flags({**flags, "mode": "profile"}, deepspeed_config)
        run_profile(config, output, console=Console())
