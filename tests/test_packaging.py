"""The distribution installs agent/ and cli/ under collision-free names, editable and as a wheel."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_editable_install_imports_collision_free_names() -> None:
    import envpipe
    import envpipe_agent
    import envpipe_cli

    assert Path(envpipe_agent.__file__).parent == REPO / "agent"
    assert Path(envpipe_cli.__file__).parent == REPO / "cli"
    assert Path(envpipe.__file__).parent == REPO / "envpipe"


@pytest.mark.slow
def test_wheel_contains_renamed_packages_and_imports(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True,
    )
    (wheel,) = tmp_path.glob("envpipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "envpipe_agent/__init__.py" in names
    assert "envpipe_cli/main.py" in names
    assert not any(n.startswith(("agent/", "cli/")) for n in names), "bare agent/ or cli/ would collide"
    # Install into a throwaway venv that sees the parent's site-packages for the dependencies.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    py = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    out = subprocess.run(
        [str(py), "-c", "import envpipe_agent, envpipe_cli, envpipe; print(envpipe_agent.__file__)"],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    ).stdout
    assert str(site) in out
