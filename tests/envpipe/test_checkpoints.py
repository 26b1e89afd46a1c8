"""``envpipe.checkpoints``: the checkpoint folder's layout (no torch): latest, complete tags, keep-last."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from envpipe import checkpoints
from envpipe.errors import ConfigError


def _fake_tag(save_dir: Path, step: int, **meta) -> Path:
    path = save_dir / checkpoints.tag_for_step(step)
    path.mkdir(parents=True)
    checkpoints.write_meta(path, {"step": step, "data_position": step * 4, **meta})
    return path


def test_latest_names_only_complete_checkpoints_and_keep_last_prunes_older_ones(tmp_path):
    for step in (5, 10, 15):
        _fake_tag(tmp_path, step)
    (tmp_path / "global_step20").mkdir()  # a save cut off before envpipe.json: never chosen, never pruned
    checkpoints.mark_latest(tmp_path, "global_step15")
    info = checkpoints.find(tmp_path)
    assert (info.step, info.tag, info.meta["data_position"]) == (15, "global_step15", 60)
    assert checkpoints.find(tmp_path / "global_step5").step == 5  # a tag folder itself
    assert checkpoints.find(tmp_path, tag="global_step10").step == 10
    removed = checkpoints.prune(tmp_path, 2)
    assert [p.name for p in removed] == ["global_step5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step10", "global_step15", "global_step20", "latest"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "no 'latest' file, so no complete EnvPipe checkpoint"),
        (lambda d: (d / "latest").write_text("global_step3"), "tag 'global_step3' has no envpipe.json"),
        (
            lambda d: (_fake_tag(d, 1) / "envpipe.json").write_text(json.dumps({"format": "other/9"})),
            "has format 'other/9'",
        ),
    ],
)
def test_bad_checkpoint_folders_are_one_clear_error(tmp_path, setup, message):
    setup(tmp_path)
    if (tmp_path / "global_step1").is_dir():
        checkpoints.mark_latest(tmp_path, "global_step1")
    with pytest.raises(ConfigError, match=message) as info:
        checkpoints.find(tmp_path, source="--resume")
    assert str(info.value).startswith(f"--resume {tmp_path}")
    with pytest.raises(ConfigError, match="no such folder"):
        checkpoints.find(tmp_path / "nope", source="--resume")
