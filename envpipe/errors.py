"""The few exception types EnvPipe raises; every user-facing error says what was wrong and how to fix it."""


class EnvpipeError(Exception):
    """Base of every EnvPipe error; the CLI turns it into a one-line message and exit code 1."""


class ConfigError(EnvpipeError):
    """A bad option, config key or value."""


class ScheduleError(EnvpipeError):
    """A schedule that breaks a dependency, deadlocks or overflows a buffer; the message carries the grid."""


class SimulationError(EnvpipeError):
    """The simulator could not run a plan with the given costs."""
