"""Small file helpers shared by the run's writers (plans, reports, checkpoint side files). No torch."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a reader sees the old file or the complete new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(data: Any, path: str | Path, *, indent: int = 2) -> None:
    """:func:`write_atomic` of ``data`` as JSON with a final newline."""
    write_atomic(path, json.dumps(data, indent=indent) + "\n")
