"""envpipe-agent: the privileged per-node daemon that alone changes GPU clocks (installed as envpipe_agent).

Runs as root, so it stays small and auditable: it imports only the standard library, pyzmq and
nvidia-ml-py (pynvml) -- never torch and never the training library.
"""

__version__ = "0.1.0"
