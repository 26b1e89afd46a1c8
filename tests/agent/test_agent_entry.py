"""The ``envpipe-agent`` command (envpipe_agent.main): flags derived from the config, version, exit codes."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from envpipe_agent.backend import BACKENDS
from envpipe_agent.config import DEPRECATED_KEYS, AgentConfig
from envpipe_agent.main import build_parser, main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("envpipe-agent ")


def test_every_config_key_is_a_flag_and_nothing_else() -> None:
    flags = {action.dest for action in build_parser()._actions} - {"help", "version", "config"}
    # and the old spellings, accepted for one release (hidden from --help)
    assert flags == {field.name for field in dataclasses.fields(AgentConfig)} | set(DEPRECATED_KEYS)


def test_backend_choices_come_from_the_registry() -> None:
    backend = next(action for action in build_parser()._actions if action.dest == "backend")
    assert tuple(backend.choices) == tuple(BACKENDS)


def test_bad_config_key_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('backend = "sim"\nlease_timeout = 3\n')
    assert main(["--config", str(config)]) == 2
    assert "lease_timeout" in capsys.readouterr().err


def test_unknown_flag_exits_2() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--colour", "blue"])
    assert exit_info.value.code == 2


def test_bad_flag_value_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "", "--backend", "cuda", "--runtime-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "invalid choice: 'cuda'" in capsys.readouterr().err


def test_the_daemon_loads_neither_typer_nor_rich() -> None:
    code = (
        "import sys\nfrom envpipe_agent.main import build_parser, main\nbuild_parser()\n"
        "bad = [m for m in ('typer', 'rich', 'click') if m in sys.modules]\nprint(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_the_docs_backend_table_is_the_registry() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    table = text.split("<!-- backends:", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| `")]
    assert {name.strip(" `"): what.strip() for name, what in rows} == {
        name: entry.description for name, entry in BACKENDS.items()
    }
