"""Where each value of a run's config came from, and the type check that names it (no torch).

A value comes from a flag (``--data``), from the ``"envpipe"`` block of the DeepSpeed JSON
(``ds.json: envpipe.data``), from DeepSpeed's own keys in that file (``ds.json:
gradient_accumulation_steps``) or from the defaults. Every error about a value names that source, so the
user fixes the place they actually wrote it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from envpipe.errors import ConfigError

# How each annotation's type reads in an error, and the Python types that satisfy it.
_KINDS: dict[str, tuple[str, tuple[type, ...]]] = {
    "int": ("an integer", (int,)),
    "float": ("a number", (int, float)),
    "str": ("a string", (str,)),
    "bool": ("true or false", (bool,)),
    "dict[str, Any]": ("an object", (dict,)),
}


# Fields whose flag is not their name with dashes.
_FLAGS = {"compare_rounds": "--compare"}


def flag_name(name: str) -> str:
    """The command-line flag of a config field (``micro_batches`` -> ``--micro-batches``)."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def block_source(path: Any, key: str) -> str:
    """How a key of the ``"envpipe"`` block is named in errors: ``ds.json: envpipe.data``."""
    return f"{getattr(path, 'name', path)}: envpipe.{key}"


class Sources(dict):
    """Field name -> where its value came from; unknown fields read as their flag."""

    def __missing__(self, name: str) -> str:
        return flag_name(name)

    def name_of(self, name: str) -> str:
        """The source of ``name`` (for ``ControllerConfig.validate(name_of=...)``)."""
        return self[name]


def check_types(cls: type, values: dict[str, Any], sources: Sources) -> None:
    """Raise ``ConfigError`` for the first value whose type does not fit its field of dataclass ``cls``.

    Args:
        cls: the config dataclass (annotations as strings, ``from __future__ import annotations``).
        values: field name -> value, before the dataclass is built.
        sources: where each value came from.
    """
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for name, value in values.items():
        annotation = fields.get(name)
        if annotation is None:
            continue
        parts = [p.strip() for p in annotation.split("|")]
        if value is None and "None" in parts:
            continue
        kinds = [_KINDS[p] for p in parts if p in _KINDS]
        if not kinds:
            continue
        ok = any(isinstance(value, types) and not _bool_as_number(value, types) for _, types in kinds)
        if not ok:
            wanted = " or ".join(label for label, _ in kinds) + (" or null" if "None" in parts else "")
            raise ConfigError(
                f"{sources[name]} must be {wanted}, got {value!r} ({type(value).__name__}); fix that value"
            )


def _bool_as_number(value: Any, types: tuple[type, ...]) -> bool:
    """``True`` is an ``int`` to Python; as a count or a rate it is a mistake."""
    return isinstance(value, bool) and bool not in types
