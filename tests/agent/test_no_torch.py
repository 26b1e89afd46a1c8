"""The root agent imports neither torch nor the training library (it stays small and auditable)."""

from __future__ import annotations

import subprocess
import sys


def test_agent_imports_no_torch_and_no_envpipe() -> None:
    code = (
        "import sys, envpipe_agent.server, envpipe_agent.main, envpipe_agent.client, envpipe_agent.sim, "
        "envpipe_agent.nvml, envpipe_agent.embedded\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.') or m == 'envpipe' "
        "or m.startswith('envpipe.'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
