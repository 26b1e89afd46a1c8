"""Choices for the CLI, derived from the registries (never listed by hand), and deprecated old spellings."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from typing import Any

from envpipe_cli._errors import err_console


def choice_enum(name: str, names: Iterable[str]) -> Any:
    """A ``str`` Enum whose members are ``names`` (typer shows them as the option's choices)."""
    return Enum(name, {value: value for value in names}, type=str)


def value_of(choice: Any) -> Any:
    """The plain value of an Enum choice (None and plain values pass through)."""
    return choice.value if isinstance(choice, Enum) else choice


def deprecated(old: str, new: str, old_value: Any, new_value: Any) -> Any:
    """Map an old flag spelling to the new one for one release, with one warning line on stderr.

    Raises:
        ValueError: both spellings were given.
    """
    if old_value is None:
        return new_value
    if new_value is not None:
        raise ValueError(f"give {new} only ({old} is its old spelling)")
    err_console.print(
        f"[yellow]warning:[/] {old} is deprecated, use {new} (the old spelling goes in the next release)",
        highlight=False,
    )
    return old_value
