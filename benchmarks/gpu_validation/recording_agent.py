"""The real agent (``python -m envpipe_agent`` flags) with one observation hook: every phase event's receipt.

``python recording_agent.py RECORD.json -- --config '' --backend nvml --read-only --runtime-dir DIR``

The hook wraps ``Agent.handle_event`` and keeps ``(received_ns, lease_id, unit, kind)`` for each frame, the
``received_ns`` being the agent's own ``time.monotonic_ns()`` stamp (CLOCK_MONOTONIC, shared by every
process of the machine), and writes them to RECORD.json when the agent exits (SIGTERM). Nothing else of the
agent changes: the frame then goes through the agent's own handler.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    """Run the agent with the hook; write the record on the way out."""
    if len(argv) < 2 or argv[1] != "--":
        print("usage: recording_agent.py RECORD.json -- AGENT-FLAGS...", file=sys.stderr)
        return 2
    record_path, agent_argv = Path(argv[0]), argv[2:]
    from envpipe_agent import main as agent_main
    from envpipe_agent.protocol import EVENT_BEGIN, ProtocolError, decode_event
    from envpipe_agent.server import Agent

    records: list[tuple[int, int, str, str]] = []
    original = Agent.handle_event

    def handle_event(self: Agent, frame: bytes, received_ns: int) -> None:
        try:
            event = decode_event(frame)
            kind = "begin" if event.kind == EVENT_BEGIN else "end"
            records.append((received_ns, event.lease_id, event.unit, kind))
        except ProtocolError:
            records.append((received_ns, 0, "", "malformed"))
        original(self, frame, received_ns)

    Agent.handle_event = handle_event  # type: ignore[method-assign]
    try:
        return agent_main.main(agent_argv)
    finally:
        record_path.write_text(json.dumps({"events": records}))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
