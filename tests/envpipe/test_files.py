import json
from pathlib import Path

import pytest

from envpipe.files import write_atomic, write_json_atomic


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path: Path):
    path = tmp_path / "plan.json"
    path.write_text("old")
    write_json_atomic({"a": 1}, path, indent=1)
    assert json.loads(path.read_text()) == {"a": 1}
    assert path.read_text().endswith("\n")
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_a_failed_write_keeps_the_old_file_whole(tmp_path: Path):
    path = tmp_path / "latest"
    path.write_text("global_step10")
    with pytest.raises(TypeError):
        write_json_atomic({"x": object()}, path)  # not JSON: fails before anything is written
    with pytest.raises(UnicodeEncodeError):
        write_atomic(path, "\udcff")  # fails while writing the temporary file
    assert path.read_text() == "global_step10"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]
