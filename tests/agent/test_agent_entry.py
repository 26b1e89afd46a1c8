"""The ``envpipe-agent`` console script (typer front of envpipe_agent.main): version, exit codes."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from envpipe_cli.agent import app

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("envpipe-agent ")


def test_bad_config_key_exits_2_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('backend = "sim"\nlease_timeout = 3\n')
    result = runner.invoke(app, ["--config", str(config)])
    assert result.exit_code == 2
    assert "lease_timeout" in result.output


def test_unknown_flag_exits_2() -> None:
    assert runner.invoke(app, ["--colour", "blue"]).exit_code == 2


def test_bad_flag_value_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--config", "", "--backend", "cuda", "--runtime-dir", str(tmp_path)])
    assert result.exit_code == 2 and "backend must be one of" in result.output
