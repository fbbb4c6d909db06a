"""The `turbofed` front door (issue #17): every option says what it does, `--version`
answers, and `turbofed flash` refuses a platform no bundle can serve in one line."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.test_flash import SITE, write_fleet
from turbofed.cli import build_parser
from turbofed.deploy import flash


def _options(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    """(command path, action) for every argument of `parser` and of its subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def _subcommands(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, str]]:
    """(command path, help) for every subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{path} {name}", helps.get(name) or ""
                yield from _subcommands(sub, f"{path} {name}")


def test_every_option_and_subcommand_has_help() -> None:
    parser = build_parser()
    options = list(_options(parser, "turbofed"))
    assert len(options) > 80  # the walk reached the subcommands' options
    missing = [f"{path} {'/'.join(a.option_strings) or a.dest}" for path, a in options if not (a.help or "").strip()]
    assert missing == []
    silent = [path for path, text in _subcommands(parser, "turbofed") if not text.strip()]
    assert silent == []


def test_help_text_of_the_options_the_issue_named() -> None:
    """`turbofed demo --help` and `turbofed dashboard --help` print what the options mean."""
    demo = subprocess.run([sys.executable, "-m", "turbofed.cli", "demo", "--help"], capture_output=True, text=True, timeout=60)
    assert demo.returncode == 0
    for words in ("FD001..FD004", "edge agents, one per site", "federated rounds"):
        assert words in " ".join(demo.stdout.split())
    dash = subprocess.run([sys.executable, "-m", "turbofed.cli", "dashboard", "--help"], capture_output=True, text=True, timeout=60)
    assert "HTTP port" in dash.stdout and "results store" in dash.stdout


def test_version() -> None:
    proc = subprocess.run([sys.executable, "-m", "turbofed.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"turbofed {version('turbofed')}"


@pytest.mark.parametrize("platform", ["win_amd64", "macosx_14_0_arm64", "musllinux_1_2_x86_64", "any"])
def test_flash_refuses_platforms_it_cannot_serve(tmp_path: Path, platform: str) -> None:
    """A Windows, macOS or musl target is refused before anything is planned or written:
    one line on stderr naming the platform, exit 2, no traceback."""
    fleet = write_fleet(tmp_path)
    out = tmp_path / "bundle"
    proc = subprocess.run(
        [sys.executable, "-m", "turbofed.cli", "flash", "--site", SITE, "--fleet", str(fleet), "--out", str(out), "--platform", platform, "--dry-run"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("turbofed: error: --platform ") and platform in lines[0], proc.stderr
    assert "glibc Linux only" in lines[0]
    assert proc.stdout == "" and not out.exists()


def test_flash_still_serves_linux_tags() -> None:
    assert flash.resolve_target("manylinux2014_aarch64", "3.11").arch == "aarch64"
    assert flash.resolve_target("linux_x86_64", "3.12").arch == "x86_64"


@pytest.mark.parametrize("host", [None, "pi@10.0.0.7"])
def test_dry_run_ends_with_the_credentials_hint(tmp_path: Path, host: str | None) -> None:
    """install.sh asks for the broker login unless given one: the last line says how."""
    fleet = write_fleet(tmp_path)
    args = ["--host", host] if host else []
    proc = subprocess.run(
        [sys.executable, "-m", "turbofed.cli", "flash", "--site", SITE, "--fleet", str(fleet), "--out", str(tmp_path / "b"),
         "--platform", "linux_aarch64", "--dry-run", *args],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("#") and "install.sh" in last and "--credentials FILE" in last and "--no-credentials" in last
