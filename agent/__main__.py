"""``python -m envpipe_agent``: run the node agent (see envpipe_agent.main)."""

import sys

from envpipe_agent.main import main

sys.exit(main())
