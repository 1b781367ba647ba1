"""Test-wide settings: every test run profiles into its own fresh cache, so that the
suite never depends on (or pollutes) a user's ~/.cache/placer; `gpu` tests skip
where CUDA is absent."""

import os
import tempfile

import pytest
import torch


def pytest_configure(config):
    os.environ["PLACER_CACHE"] = tempfile.mkdtemp(prefix="placer-test-cache-")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
