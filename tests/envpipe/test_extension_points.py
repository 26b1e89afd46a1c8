"""The registries: docs/registries.md is generated from them, and lookups fail with the choices."""

from __future__ import annotations

from pathlib import Path

import pytest

from envpipe.errors import ConfigError
from envpipe.extension_points import docs
from envpipe.registry import Registry
from envpipe.schedules import SCHEDULES, trainable

DOCS = Path(__file__).resolve().parents[2] / "docs" / "registries.md"


def test_docs_tables_are_generated_from_the_registries() -> None:
    assert DOCS.read_text() == docs(), "regenerate: python -m envpipe.extension_points > docs/registries.md"


def test_lookup_names_the_source_and_every_choice() -> None:
    with pytest.raises(ConfigError, match=r"unknown schedule 'gpipe' \(--scheduling\); choose one of 1f1b, ours"):
        SCHEDULES.lookup("gpipe", source="--scheduling")


def test_a_name_registered_twice_is_refused() -> None:
    class Entry:
        def __init__(self, name: str) -> None:
            self.name, self.summary = name, name

    with pytest.raises(ValueError, match="registered twice"):
        Registry("thing", [Entry("a"), Entry("a")])


def test_train_offers_only_what_deepspeeds_engine_runs() -> None:
    from envpipe.controller.config import choices_by_key

    assert trainable() == ("1f1b", "ours") == choices_by_key()["scheduling"]
