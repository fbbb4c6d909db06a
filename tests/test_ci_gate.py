"""The CI gate: the same skips pass on a laptop and fail with CI=true."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

SUITE = {
    "test_runs.py": "def test_ok():\n    assert True\n",
    "test_skips.py": "import pytest\n\ndef test_needs_a_broker():\n    pytest.skip('mosquitto is not installed')\n",
    "test_module_skip.py": "import pytest\npytest.skip('C-MAPSS data not found', allow_module_level=True)\n\ndef test_x():\n    pass\n",
}
REPO = Path(__file__).resolve().parent.parent


def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str | None) -> pytest.RunResult:
    pytester.makepyfile(**{name[:-3]: body for name, body in SUITE.items()})
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    return pytester.runpytest_subprocess("-p", "tests.ci_gate", "-p", "no:cacheprovider")


def test_skips_are_skips_outside_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run(pytester, monkeypatch, None)
    result.assert_outcomes(passed=1, skipped=2)
    assert result.ret == 0


def test_skips_fail_the_run_in_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run(pytester, monkeypatch, "true")
    assert result.ret != 0
    # A module that skips itself at import stops the run at collection, loudly.
    result.stdout.fnmatch_lines(["*skipped under CI=true, which fails the run*C-MAPSS data not found*"])
    (pytester.path / "test_module_skip.py").unlink()
    result = pytester.runpytest_subprocess("-p", "tests.ci_gate", "-p", "no:cacheprovider")
    assert result.ret != 0
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*skipped under CI=true, which fails the run: mosquitto is not installed*"])
