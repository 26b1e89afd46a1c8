"""This rank's agent energy windows; a dead or stuck agent costs one warning, never the run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class EnergyMeter:
    """Opens and closes the agent's energy windows for this rank.

    ``window_begin``/``window_end`` raise ``AgentError`` (``AgentUnavailable`` after the client's timeout)
    when the agent is gone or stopped; the window's energy is then ``None`` (unavailable, not zero) and
    training goes on. The next window asks the agent again (it may have come back).
    """

    def __init__(self, client: Any, warn: Callable[[str], None]) -> None:
        """``client``: an ``envpipe_agent.client.AgentClient`` or None (no agent: every window is None)."""
        self.client = client
        self.warn = warn
        self.unavailable = 0  # windows of this rank without energy

    def begin(self) -> int | None:
        """Open a window; None when the agent did not answer (or there is none)."""
        from envpipe_agent.errors import AgentError

        if self.client is None:
            return None
        try:
            return self.client.window_begin()
        except AgentError as exc:
            self._failed(exc)
            return None

    def end(self, window_id: int | None) -> Any:
        """Close a window: an ``EnergyWindow``; None when never opened or the agent did not answer."""
        from envpipe_agent.errors import AgentError

        if window_id is None:
            return None
        try:
            return self.client.window_end(window_id)
        except AgentError as exc:
            self._failed(exc)
            return None

    def _failed(self, exc: Exception) -> None:
        self.unavailable += 1
        if self.unavailable == 1:  # warn once: a dead agent fails every window, the summary counts them
            self.warn(
                f"warning: the agent did not answer an energy window ({type(exc).__name__}: {exc}); training "
                "goes on, and windows without an answer are reported as energy unavailable"
            )
