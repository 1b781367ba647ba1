"""Test-wide settings: every test run profiles into its own fresh cache (one for all of
its xdist worker processes, so that a profile made by one serves the other), so that the
suite never depends on (or pollutes) a user's ~/.cache/placer; every test, and every
placer process a test starts, sees an idle host (the load average behind
placer.runtime.host_load.busy_host is 0, also through $PLACER_LOAD_AVERAGE; a test of
the busy-host rule patches it higher) and starts at the suite's torch thread count; `gpu` tests skip where CUDA is absent; the
zoo models' placement problems are built once a session; the objects alive once the
tests are collected (torch and the other imports) are left out of the
garbage collector's full passes (gc.freeze)."""

import functools
import gc
import os
import tempfile
from collections.abc import Callable

import pytest
import torch

from graphs.problem import PlacementProblem, build_problem


def pytest_configure(config):
    if "PYTEST_XDIST_WORKER" not in os.environ:  # a worker keeps the cache its controller made
        os.environ["PLACER_CACHE"] = tempfile.mkdtemp(prefix="placer-test-cache-")
    os.environ["PLACER_LOAD_AVERAGE"] = "0"  # an idle host for the placer processes tests start, too


def pytest_collection_finish(session):
    # Every measured trial's close runs a full gc.collect (placer.runtime.timing): over the
    # imports' ~270k objects each took ~0.3 s, a third of the time of the measuring tests.
    # Frozen objects are still freed by reference counting; only cycles among them would stay.
    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def idle_host(monkeypatch):
    """The host's load average reads 0 (idle), whatever the real one is: no test's verdict
    depends on other work on the host."""
    monkeypatch.setenv("PLACER_LOAD_AVERAGE", "0")  # pytest_configure's too: fixtures of wider scope run first


@pytest.fixture(autouse=True)
def torch_threads():
    """Each test starts at the thread count the suite started with: placer.apply leaves the
    caller at its plan's CPU devices' count (1 for cpu:k), by design."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """torch's intra-op threads at 1 (a virtual CPU device's on this host), as they were after."""
    yield from _threads(1)


@pytest.fixture
def two_threads():
    """torch's intra-op threads at 2 (an unplaced model's, which a busy host stalls), as they were after."""
    yield from _threads(2)


@pytest.fixture(scope="session")
def zoo_problem() -> Callable[[str], PlacementProblem]:
    """`zoo_problem(name)`: the zoo model's placement problem at its small size on
    cpu:0,cpu:1 (at most 48 groups), built once a session (capture and profiling are the
    expensive part); its `ops` is the profiled OpGraph. Callers must not modify it."""

    @functools.cache
    def build(name: str):
        return build_problem(f"zoo:{name}:small", devices="cpu:0,cpu:1", max_groups=48)

    return build
