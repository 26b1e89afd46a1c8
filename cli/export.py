"""``envpipe export CHECKPOINT DIR``: a training checkpoint as a Hugging Face Llama folder.

Reads the checkpoint folder that ``envpipe train --save-dir`` writes (no ranks, no GPU) and writes
``config.json``, ``model.safetensors`` and the tokenizer files of the model it was trained from, loadable by
``AutoModelForCausalLM.from_pretrained(DIR)`` (``envpipe.export``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from envpipe_cli._errors import user_errors


def export(
    checkpoint: Annotated[
        Path, typer.Argument(help="A --save-dir folder (its latest checkpoint) or one of its global_step<N> tags.")
    ],
    out_dir: Annotated[Path, typer.Argument(metavar="DIR", help="The Hugging Face folder to write (new or empty).")],
    tag: Annotated[
        str | None, typer.Option("--tag", help="A tag of the --save-dir folder instead of its latest.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Write into a folder that already has files.")
    ] = False,
) -> None:
    """Assemble a pipeline checkpoint's stages into one Hugging Face Llama folder."""
    from envpipe.export import export_hf

    with user_errors():
        result = export_hf(checkpoint, out_dir, tag=tag, overwrite=overwrite)
    typer.echo(
        f"exported step {result.step} of {result.source} to {result.path}: {', '.join(result.files)}"
    )
