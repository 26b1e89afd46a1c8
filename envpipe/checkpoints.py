"""The layout of an EnvPipe checkpoint folder, readable without torch (the CLI checks it before ranks start).

A save folder holds one DeepSpeed checkpoint per tag (``global_step<N>/``: DeepSpeed's own
``layer_XX-model_states.pt`` per pipe layer and ``mp_rank_XX_model_states.pt`` per stage with the optimizer
and LR scheduler), plus, written by EnvPipe into the same tag folder:

* ``envpipe.json`` — :data:`FORMAT`, the step, the data position (micro-batches each pipeline has consumed),
  the topology it was saved with, the schedule and clock plan with its fingerprint, the run's settings;
* ``rng/rank<R>.pt`` — every rank's RNG states (torch CPU/CUDA, Python, NumPy);
* ``plan.json`` — the plan in use (a plan file, fingerprint included), when one was made;
* ``config.json`` and the tokenizer files of the model it was trained from, so that a tag folder alone
  can be exported to a Hugging Face folder (``envpipe export``).

``latest`` names the newest complete tag. EnvPipe writes it itself, after ``envpipe.json``: a save cut off
half-way leaves ``latest`` on the previous complete checkpoint (DeepSpeed's own ``latest`` is switched off).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envpipe.errors import ConfigError
from envpipe.files import write_atomic

FORMAT = "envpipe-checkpoint/1"
SIDE_FILE = "envpipe.json"
PLAN_FILE = "plan.json"  # the plan in use, as a plan file (``--plan``): a resumed run skips profiling
LATEST = "latest"
TAG_PREFIX = "global_step"
# Files a Hugging Face model folder may carry besides weights and config.json: copied along with a checkpoint.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
_TAG_RE = re.compile(rf"^{TAG_PREFIX}(\d+)$")


def tag_for_step(step: int) -> str:
    """The tag of the checkpoint taken after ``step`` iterations (DeepSpeed's own naming)."""
    return f"{TAG_PREFIX}{step}"


@dataclass(frozen=True)
class CheckpointInfo:
    """One complete checkpoint: its folder and what ``envpipe.json`` says about it."""

    path: Path
    meta: dict[str, Any]

    @property
    def tag(self) -> str:
        """The tag folder's name."""
        return self.path.name

    @property
    def step(self) -> int:
        """Iterations done when it was saved."""
        return int(self.meta["step"])

    @property
    def save_dir(self) -> Path:
        """The folder holding this tag (and ``latest``)."""
        return self.path.parent


def find(checkpoint: str | Path, *, tag: str | None = None, source: str = "checkpoint") -> CheckpointInfo:
    """The checkpoint named by a save folder (its ``latest``, or ``tag``) or by a tag folder itself.

    Args:
        checkpoint: a save folder (``--save-dir``) or one of its tag folders.
        tag: a tag inside the save folder; default the one ``latest`` names.
        source: what to call ``checkpoint`` in errors (the flag the user gave).

    Raises:
        ConfigError: no such folder, no complete checkpoint in it, or an ``envpipe.json`` this version
            cannot read.
    """
    path = Path(checkpoint)
    if not path.is_dir():
        raise ConfigError(f"{source} {path}: no such folder; give a --save-dir folder or one of its tags")
    if tag is None and (path / SIDE_FILE).is_file():
        return _read(path, source)
    if tag is None:
        latest = path / LATEST
        if not latest.is_file():
            tags = ", ".join(t.name for t in list_tags(path)) or "none"
            raise ConfigError(
                f"{source} {path}: no '{LATEST}' file, so no complete EnvPipe checkpoint (tags found: {tags}); "
                "give a folder written by `envpipe train --save-dir`, or a tag folder"
            )
        tag = latest.read_text().strip()
    tag_path = path / tag
    if not (tag_path / SIDE_FILE).is_file():
        raise ConfigError(
            f"{source} {path}: tag {tag!r} has no {SIDE_FILE} (missing or saved incompletely); "
            f"pick another with --tag ({', '.join(t.name for t in list_tags(path)) or 'none found'})"
        )
    return _read(tag_path, source)


def _read(tag_path: Path, source: str) -> CheckpointInfo:
    try:
        meta = json.loads((tag_path / SIDE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{source} {tag_path}/{SIDE_FILE} cannot be read ({exc}); pick another tag") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ConfigError(
            f"{source} {tag_path}/{SIDE_FILE} has format {found!r}, this EnvPipe reads {FORMAT!r}; "
            "resume with the EnvPipe version that wrote it"
        )
    return CheckpointInfo(tag_path, meta)


def list_tags(save_dir: Path) -> list[Path]:
    """The complete ``global_step<N>`` folders of ``save_dir``, oldest step first."""
    found = []
    for child in save_dir.iterdir() if save_dir.is_dir() else ():
        match = _TAG_RE.match(child.name)
        if match and (child / SIDE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def write_meta(tag_path: Path, meta: dict[str, Any]) -> None:
    """Write ``envpipe.json`` atomically (a reader never sees half a file)."""
    write_atomic(tag_path / SIDE_FILE, json.dumps({"format": FORMAT, **meta}, indent=2, sort_keys=True))


def mark_latest(save_dir: Path, tag: str) -> None:
    """Point ``latest`` at ``tag`` atomically (call once the tag is complete)."""
    write_atomic(save_dir / LATEST, tag)


def prune(save_dir: Path, keep_last: int | None) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete tags (never the one ``latest`` names).

    Returns:
        The folders removed.
    """
    if not keep_last:
        return []
    latest = (save_dir / LATEST).read_text().strip() if (save_dir / LATEST).is_file() else None
    removed = []
    for path in list_tags(save_dir)[:-keep_last]:
        if path.name != latest:
            shutil.rmtree(path)
            removed.append(path)
    return removed


def copy_model_files(model_dir: str | Path | None, dest: Path) -> list[str]:
    """Copy the tokenizer (and generation config) files of a Hugging Face folder into ``dest``.

    Returns:
        The names copied (none for a preset or a folder without tokenizer).
    """
    if model_dir is None or not Path(model_dir).is_dir():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(model_dir) / name
        if src.is_file():
            shutil.copyfile(src, dest / name)
            copied.append(name)
    return copied

