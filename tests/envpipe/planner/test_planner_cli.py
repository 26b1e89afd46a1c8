"""``envpipe simulate --reconfig`` runs the planner's policies."""

from __future__ import annotations

import json

from envpipe_cli.main import app
from typer.testing import CliRunner

from envpipe.planner import POLICIES


def test_simulate_accepts_every_policy_and_meets_the_bound() -> None:
    assert "paper-greedy" in POLICIES
    runner = CliRunner()
    for policy in ("optimal", "balanced"):
        result = runner.invoke(app, ["simulate", "-S", "4", "-M", "8", "--reconfig", policy, "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert report["simulated"] is True and report["reconfig"] == policy
        assert report["slowdown"] <= 0.01 + 1e-9
        assert report["energy_saving"] > 0.05


def test_unknown_policy_is_a_usage_error_naming_the_choices() -> None:
    result = CliRunner().invoke(app, ["simulate", "--reconfig", "fastest"])
    assert result.exit_code == 2
    text = " ".join(" ".join(line.strip(" │╭╮╰╯─") for line in result.output.splitlines()).split())
    assert "'fastest' is not one of" in text and "'paper-greedy'" in text
