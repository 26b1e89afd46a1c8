"""``envpipe.export``: a pipeline checkpoint becomes a Hugging Face folder whose logits equal the pipeline's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from envpipe import checkpoints
from envpipe.deepspeed.launcher import run_ranks
from envpipe.errors import ConfigError
from envpipe.export import export_hf

WORKERS = str(Path(__file__).parent / "deepspeed" / "checkpoint_workers.py")


def _save_tiny(path: Path, *, tied: bool, tokenizer: bool) -> str:
    import torch
    from transformers import LlamaForCausalLM

    from envpipe.models.llama import load_config

    torch.manual_seed(0)
    config = load_config("llama-tiny")
    config.tie_word_embeddings = tied
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    if tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        words = Tokenizer(models.WordLevel({"[UNK]": 0, "red": 1, "green": 2}, unk_token="[UNK]"))
        words.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two checkpoints of a 2-stage run (untied with a tokenizer; tied without) and the pipeline's logits."""
    root = tmp_path_factory.mktemp("export")
    dirs = [
        _save_tiny(root / "untied", tied=False, tokenizer=True),
        _save_tiny(root / "tied", tied=True, tokenizer=False),
    ]
    results = run_ranks(2, f"{WORKERS}:export_logits", {"model_dirs": dirs, "save_root": str(root / "ckpt")}, timeout_s=300)
    assert all(r.returncode == 0 for r in results), "\n".join(r.stderr_tail for r in results)
    return root / "ckpt"


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1], ids=["untied-with-tokenizer", "tied"])
def test_exported_folder_loads_in_transformers_with_the_pipelines_logits(trained, tmp_path, index):
    import torch
    from transformers import AutoModelForCausalLM

    save_dir = trained / str(index)
    result = export_hf(save_dir, tmp_path / "hf")
    assert result.step == 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True, attn_implementation="sdpa")
    probe = torch.load(save_dir / "probe.pt", weights_only=True)
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    assert torch.allclose(logits, probe["logits"], rtol=1e-5, atol=1e-5)
    assert "model.safetensors" in result.files and "config.json" in result.files
    if index == 0:
        assert {"tokenizer.json", "tokenizer_config.json"} <= set(result.files)
        from transformers import AutoTokenizer

        assert AutoTokenizer.from_pretrained(tmp_path / "hf")("red green")["input_ids"] == [1, 2]
    else:
        assert model.config.tie_word_embeddings
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert not any(name.startswith("tokenizer") for name in result.files)
    # the trained weights, not the initial ones: the folder differs from the model it started from
    start = AutoModelForCausalLM.from_pretrained(trained.parent / ("untied" if index == 0 else "tied"))
    assert not torch.equal(start.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


@pytest.mark.slow
def test_export_refuses_a_non_empty_folder_and_an_incomplete_checkpoint(trained, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already has files"):
        export_hf(trained / "0", tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    broken = tmp_path / "broken"
    tag = checkpoints.find(trained / "0").path
    import shutil

    shutil.copytree(tag, broken / tag.name)
    checkpoints.mark_latest(broken, tag.name)
    next((broken / tag.name).glob("layer_02-*")).unlink()
    with pytest.raises(ConfigError, match="pipe layer 2 is missing"):
        export_hf(broken, tmp_path / "out")


def test_export_of_a_folder_that_is_no_checkpoint_says_so(tmp_path):
    with pytest.raises(ConfigError, match="no 'latest' file"):
        export_hf(tmp_path, tmp_path / "out")
    tag = tmp_path / "global_step1"
    tag.mkdir()
    (tag / "envpipe.json").write_text(json.dumps({"format": checkpoints.FORMAT, "step": 1, "data_position": 4}))
    with pytest.raises(ConfigError, match="no config.json"):
        export_hf(tag, tmp_path / "out")
