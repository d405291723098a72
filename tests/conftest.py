"""Shared fixtures. The end-to-end fixtures live here; see tests/helpers.py for the protocol."""

from __future__ import annotations

import pytest
from helpers import E2E, build_workloads


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember each phase's report on the item (item.rep_call...) for fixtures."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def _passed(request) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return rep is not None and rep.passed


@pytest.fixture(scope="session")
def workload_bins():
    """The C workloads, compiled once per session (cached by content hash)."""
    return build_workloads()


@pytest.fixture
def e2e(request, tmp_path, workload_bins):
    """Processes and scratch space for one test; everything is killed and reaped after it.
    Image directories are deleted after a passing test (kept for a failing one)."""
    env = E2E(tmp_path, workload_bins)
    try:
        yield env
    finally:
        env.cleanup()
        if _passed(request):
            env.remove_images()


@pytest.fixture(scope="module")
def module_e2e(tmp_path_factory, workload_bins):
    """Like e2e, shared by one test module (for an image many tests start from)."""
    env = E2E(tmp_path_factory.mktemp("module"), workload_bins)
    try:
        yield env
    finally:
        env.cleanup()
