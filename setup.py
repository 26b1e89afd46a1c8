"""Package discovery: agent/ and cli/ install under collision-free import names.

The folders keep the product's short names (agent/, cli/) while the installed modules are
``envpipe_agent`` and ``envpipe_cli``, so nothing claims the generic top-level names ``agent`` or ``cli``.
"""

from setuptools import find_packages, setup

FOLDERS = {"envpipe": "envpipe", "envpipe_agent": "agent", "envpipe_cli": "cli"}


def _packages(import_name: str, folder: str) -> list[str]:
    return [import_name] + [f"{import_name}.{sub}" for sub in find_packages(folder)]


setup(
    packages=[pkg for name, folder in FOLDERS.items() for pkg in _packages(name, folder)],
    package_dir={name: folder for name, folder in FOLDERS.items() if name != folder},
    package_data={"envpipe_agent": ["py.typed"], "envpipe": ["py.typed"]},
)
