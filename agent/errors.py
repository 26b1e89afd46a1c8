"""Errors the agent client raises; the CLI prints them as one line (see envpipe_cli._errors)."""

from __future__ import annotations


class AgentError(Exception):
    """Base of every agent-side error. ``code`` is the protocol error code when the agent sent one."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class AgentUnavailable(AgentError):
    """No agent answered at the endpoint within the timeout."""


class LeaseError(AgentError):
    """A claim was refused (another holder) or a lease is no longer valid."""


class AgentConfigError(AgentError):
    """A bad agent config key, value or flag; the agent exits with code 2."""
