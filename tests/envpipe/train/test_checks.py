"""Checks before the ranks start: model folders, stages vs layers, DeepSpeed monitors (one error line each)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from envpipe.errors import ConfigError
from envpipe.train.checks import check_monitors, check_stages, model_shape


def _folder(tmp_path, config=None, files=()):
    folder = tmp_path / "m"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    for name in files:
        (folder / name).write_bytes(b"x")
    return str(folder)


LLAMA = {"model_type": "llama", "vocab_size": 512, "num_hidden_layers": 3}


def test_presets_and_llama_folders_give_their_shape(tmp_path):
    assert model_shape("tiny").num_hidden_layers == 4 and model_shape("llama-tiny").model_dir is None
    shape = model_shape(_folder(tmp_path, LLAMA, ["model.safetensors"]))
    assert (shape.vocab_size, shape.num_hidden_layers) == (512, 3)
    with pytest.raises(ConfigError, match="--stages 4: the model .* has 3 decoder layers, fewer than the stages"):
        check_stages(shape, 4)


@pytest.mark.parametrize(
    ("config", "files", "message"),
    [
        (None, [], "the folder has no config.json"),
        ("{oops", [], "not valid JSON"),
        ({"model_type": "gpt2", "vocab_size": 5, "num_hidden_layers": 2}, ["model.safetensors"], "model_type is 'gpt2'"),
        (LLAMA, [], "config.json but no \\*.safetensors weights"),
        (LLAMA, ["pytorch_model.bin"], "the weights are PyTorch .bin files"),
        ({**LLAMA, "vocab_size": "many"}, ["model.safetensors"], "vocab_size must be a positive integer"),
    ],
)
def test_bad_model_folders_are_one_error_line_naming_the_source(tmp_path, config, files, message):
    folder = _folder(tmp_path, config, files)
    with pytest.raises(ConfigError, match=message) as info:
        model_shape(folder, source="ds.json: envpipe.model")
    assert str(info.value).startswith("ds.json: envpipe.model ") and "\n" not in str(info.value)


def test_unknown_model_name_is_never_downloaded():
    with pytest.raises(ConfigError, match="not a preset and not a local model folder"):
        model_shape("meta-llama/Llama-3.2-1B")


def test_enabled_monitor_without_its_package_is_refused_before_ranks_start(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    ds = {"csv_monitor": {"enabled": True, "output_path": "x"}, "tensorboard": {"enabled": False}}
    assert check_monitors(ds, source="ds.json") == ["csv_monitor"]
    with pytest.raises(ConfigError, match='ds.json: "wandb" is enabled but the wandb package is not installed'):
        check_monitors({**ds, "wandb": {"enabled": True}}, source="ds.json")
    with pytest.raises(ConfigError, match='"tensorboard" must be an object'):
        check_monitors({"tensorboard": True}, source="ds.json")


def test_checks_import_neither_torch_nor_transformers(tmp_path):
    folder = _folder(tmp_path, LLAMA, ["model.safetensors"])
    code = (
        "import sys; from envpipe.train.checks import model_shape, check_monitors; "
        f"model_shape({folder!r}); model_shape('tiny'); check_monitors({{'csv_monitor': {{'enabled': True}}}}, source='x'); "
        "print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
