"""Reliability scenarios of the agent and the training side (issue 6): faults, load and hostile input.

Each scenario module has a ``run(**limits) -> dict`` function; ``python -m benchmarks.reliability`` runs
them at full size and tests/reliability runs them at CI size. Results are recorded in docs/reliability.md.
"""
