"""Config: TOML + flags; a bad key or value names itself and exits with code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from envpipe_agent.config import resolve_config
from envpipe_agent.errors import AgentConfigError
from envpipe_agent.main import main


def _toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return str(path)


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'backend = "sim"\ngpus = 4\nlease_timeout_s = 3\n')
    config = resolve_config(path, {"gpus": 2, "min_mhz": None})
    assert (config.backend, config.gpus, config.lease_timeout_s) == ("sim", 2, 3.0)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('colour = "blue"\n', "colour"),
        ('gpus = "two"\n', "gpus"),
        ('backend = "cuda"\n', "backend"),
        ("min_mhz = 1500\nmax_mhz = 900\n", "min_mhz"),
        ('prometheus_addr = "everywhere"\n', "prometheus_addr"),
        ("lease_timeout_s = -1\n", "lease_timeout_s"),
        # issue 12 item 8: nan passes every comparison, inf never expires (and killed the client's heartbeat)
        ("lease_timeout_s = nan\n", "lease_timeout_s"),
        ("lease_timeout_s = inf\n", "lease_timeout_s"),
        ("sample_interval_ms = nan\n", "sample_interval_ms"),
        ("sample_interval_ms = inf\n", "sample_interval_ms"),
        ("sample_interval_ms = 0.001\n", "sample_interval_ms"),
        ('log_level = "verbose"\n', "log_level"),
        ('card = "h200x"\n', "card"),
        ("max_connections_per_uid = 1\n", "max_connections_per_uid"),
        ("gpus = [\n", "not valid TOML"),
    ],
)
def test_bad_key_or_value_exits_2_naming_it(tmp_path: Path, capsys, text: str, named: str) -> None:
    assert main(["--config", _toml(tmp_path, text)]) == 2
    assert named in capsys.readouterr().err


def test_unknown_flag_exits_2(capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--colour", "blue"])
    assert caught.value.code == 2


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(AgentConfigError, match="cannot read config"):
        resolve_config(str(tmp_path / "nope.toml"), {})


def test_read_only_needs_nvml(tmp_path: Path) -> None:
    assert main(["--config", "", "--backend", "sim", "--read-only", "--runtime-dir", str(tmp_path)]) == 2


def test_allow_list_outside_the_supported_clocks_exits_2(tmp_path: Path, capsys) -> None:
    assert (
        main(["--config", "", "--backend", "sim", "--min-mhz", "5000", "--runtime-dir", str(tmp_path)]) == 2
    )
    assert "min_mhz=5000" in capsys.readouterr().err


def test_manage_needs_nvml(tmp_path: Path, capsys) -> None:
    assert main(["--config", "", "--backend", "sim", "--manage", "0", "--runtime-dir", str(tmp_path)]) == 2
    assert "manage applies to the nvml backend" in capsys.readouterr().err


def test_a_non_loopback_metrics_address_is_allowed(tmp_path: Path) -> None:
    config = resolve_config(_toml(tmp_path, 'backend = "sim"\nprometheus_addr = "0.0.0.0"\n'), {})
    assert config.prometheus_addr == "0.0.0.0"  # the risk is logged at start and documented (README)


def test_dvfs_model_and_its_old_spelling(tmp_path: Path, capsys) -> None:
    """``--dvfs-model`` as in every envpipe command; ``--model`` / ``model =`` work one release, with a warning."""
    assert resolve_config("", {"dvfs_model": "optimistic"}).dvfs_model == "optimistic"
    assert resolve_config("", {"model": "conservative"}).dvfs_model == "conservative"
    assert "--model is deprecated, use --dvfs-model" in capsys.readouterr().err
    old_file = tmp_path / "agent.toml"
    old_file.write_text('backend = "sim"\nmodel = "optimistic"\n')
    assert resolve_config(str(old_file), {}).dvfs_model == "optimistic"
    assert "model is deprecated, use dvfs_model" in capsys.readouterr().err
    with pytest.raises(AgentConfigError, match=r"give --dvfs-model only \(--model is its old name\)"):
        resolve_config("", {"dvfs_model": "central", "model": "optimistic"})
    with pytest.raises(SystemExit) as exit_info:  # argparse: a bad choice is a usage error
        main(["--backend", "sim", "--dvfs-model", "turbo"])
    assert exit_info.value.code == 2 and "invalid choice: 'turbo'" in capsys.readouterr().err
