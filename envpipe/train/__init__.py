"""The user-facing training run: config resolution, rank launch, phases, summary and report.

``envpipe train`` resolves a :class:`~envpipe.train.config.TrainConfig` once, starts (or finds) a node agent,
spawns the ranks (own spawner on CPU, the DeepSpeed launcher on GPUs), shows their progress, and prints
the summary. Nothing here imports torch at import time.
"""

from envpipe.train.config import TrainConfig, resolve

__all__ = ["TrainConfig", "resolve"]
