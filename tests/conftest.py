"""Shared pytest configuration: GPU tests are skipped where no NVIDIA driver is present."""

from __future__ import annotations

import shutil

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if shutil.which("nvidia-smi"):
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU and driver (nvidia-smi not found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
