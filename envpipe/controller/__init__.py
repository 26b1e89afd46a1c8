"""EnvPipe's controller: plans a run's clocks online, inside the training loop, then keeps it at the plan.

States (one training step per ``yield``; :mod:`envpipe.controller.states` draws the graph):
``warm-up`` → ``baseline`` (window: 1F1B, top clock) → ``profiling`` (energy valley per stage,
monotone fit)
→ ``reconfiguration`` (the planner on measured timelines) → ``at-plan`` (drift guard every
``recheck_interval`` steps, ``re-plan`` when the plan no longer fits) and, only when asked for, ``compare``
(paired rounds). A plan file with a matching fingerprint skips profiling; without an agent the run is
``unplanned`` (default clocks). Plain Python: no torch here; the DeepSpeed side is
:mod:`envpipe.deepspeed.control`, and tests drive it with a fake engine and agent.
"""

from envpipe.controller.config import ControllerConfig
from envpipe.controller.core import Context, StepResult
from envpipe.controller.driver import Controller
from envpipe.controller.ports import Gpu, SingleProcessComm

__all__ = ["Context", "Controller", "ControllerConfig", "Gpu", "SingleProcessComm", "StepResult"]
