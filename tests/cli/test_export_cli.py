"""``envpipe export``: a checkpoint folder in DeepSpeed's pipeline layout becomes a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

from envpipe_cli.main import app
from typer.testing import CliRunner

from envpipe import checkpoints

runner = CliRunner()


def _pipeline_checkpoint(save_dir: Path):
    """A tiny HF model written as DeepSpeed writes a pipeline (one file per pipe layer) plus EnvPipe's files."""
    import torch
    from transformers import LlamaForCausalLM

    from envpipe.models.llama import layer_hf_prefixes, load_config

    torch.manual_seed(3)
    config = load_config("llama-tiny")
    model = LlamaForCausalLM(config)
    hf = model.state_dict()
    tag = save_dir / "global_step7"
    tag.mkdir(parents=True)
    for index, prefix in enumerate(layer_hf_prefixes(config)):
        inner = "layer." if prefix.startswith("model.layers.") else ""
        layer = {inner + k.removeprefix(prefix): v for k, v in hf.items() if k.startswith(prefix) and (
            prefix != "model." or k.removeprefix(prefix).split(".")[0] == ("embed_tokens" if index == 0 else "norm"))}
        torch.save(layer, tag / f"layer_{index:02d}-model_states.pt")
    config.save_pretrained(tag)
    checkpoints.write_meta(tag, {"step": 7, "data_position": 28, "model_files": []})
    checkpoints.mark_latest(save_dir, tag.name)
    return model


def test_export_writes_a_folder_transformers_loads_with_the_same_logits(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    original = _pipeline_checkpoint(tmp_path / "ckpt")
    result = runner.invoke(app, ["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines() == [
        f"exported step 7 of {tmp_path / 'ckpt' / 'global_step7'} to {tmp_path / 'hf'}: "
        "config.json, generation_config.json, model.safetensors"
    ]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, original(input_ids=ids).logits)


def test_export_errors_are_one_line(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path / "missing"), str(tmp_path / "hf")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: CHECKPOINT {tmp_path / 'missing'}: no such folder; give a --save-dir folder or one of its tags"
    ]
    _pipeline_checkpoint(tmp_path / "ckpt")
    result = runner.invoke(app, ["export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--tag", "global_step3"])
    assert result.exit_code == 1 and "tag 'global_step3' has no envpipe.json" in result.output
