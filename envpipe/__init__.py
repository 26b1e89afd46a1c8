"""EnvPipe: energy-saving pipeline-parallel training.

Plain-Python parts (schedule IR, generators, verifier, simulator, planner) import no torch; the DeepSpeed
adapter under ``envpipe.deepspeed`` is the only place that knows DeepSpeed, and it is imported on demand.
"""

__version__ = "0.1.0"
