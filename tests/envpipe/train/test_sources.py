"""``envpipe.train.sources``: a value's type is checked against its field, and the error names its source."""

from __future__ import annotations

import pytest

from envpipe.errors import ConfigError
from envpipe.train.config import TrainConfig
from envpipe.train.sources import Sources, block_source, check_types


@pytest.mark.parametrize(
    ("name", "value", "wanted"),
    [
        ("steps", 2.5, "an integer"),
        ("steps", True, "an integer"),  # a bool is an int to Python, not to a user
        ("lr", "0.1", "a number"),
        ("data", 5, "a string or null"),
        ("model", None, "a string"),
        ("emulate_dvfs", "yes", "true or false or null"),
        ("keep_last", [2], "an integer or null"),
    ],
)
def test_a_wrong_type_names_the_block_key_it_was_written_in(name, value, wanted):
    sources = Sources({name: block_source("ds.json", name)})
    with pytest.raises(ConfigError) as info:
        check_types(TrainConfig, {name: value}, sources)
    assert str(info.value) == (
        f"ds.json: envpipe.{name} must be {wanted}, got {value!r} ({type(value).__name__}); fix that value"
    )


def test_right_types_pass_and_unknown_sources_read_as_flags():
    check_types(TrainConfig, {"steps": 3, "lr": 1, "data": None, "emulate_dvfs": False, "ds_config": {}}, Sources())
    assert Sources()["micro_batches"] == "--micro-batches"
