"""With CI=true, a skipped test is a failed test.

A skip says something the suite needs was missing (the C-MAPSS folder, Mosquitto, a browser):
on a developer's laptop that is a hint, in CI it means the run did not test what it claims to.
Loaded by tests/conftest.py; `tests/test_ci_gate.py` runs it on a throwaway suite.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest


def ci_enabled() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _fail_skip(report: Any) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, which fails the run: {str(reason).removeprefix('Skipped: ')}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if ci_enabled() and report.skipped and not hasattr(report, "wasxfail"):
        _fail_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if ci_enabled() and report.skipped:  # pytest.skip(..., allow_module_level=True)
        _fail_skip(report)
