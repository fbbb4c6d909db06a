"""One installed package: the wheel holds `turbofed` and nothing else, with its data files.

The card's folders (edge/, aggregator/, dashboard/, data/, broker_config/, benchmarks/)
stay at the repository root and are mapped into `turbofed.*` by pyproject.toml; a wheel
that put `edge` or `benchmarks` into site-packages would claim names other projects own.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from turbofed.deploy import flash

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from the clean source copy `turbofed flash` builds from (an in-tree build would
    leave build/ behind, whose stale files can slip into later wheels)."""
    out = tmp_path_factory.mktemp("wheel")
    source = flash._source_copy(REPO, out / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                    "-q", "-w", str(out)], check=True, timeout=300, capture_output=True)
    (found,) = out.glob("turbofed-*.whl")
    return found


def test_wheel_has_only_the_turbofed_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"turbofed"}
    for module in ("turbofed/edge/agent.py", "turbofed/aggregator/service.py", "turbofed/dashboard/app.py",
                   "turbofed/dashboard/screens/fleet.py", "turbofed/data/cmapss.py", "turbofed/store/sqlite.py",
                   "turbofed/simulation/replay.py", "turbofed/deploy/flash.py", "turbofed/benchmarks/accuracy.py",
                   "turbofed/messages/__init__.py", "turbofed/messages/plant.py"):
        assert module in names, module


def test_wheel_carries_its_data_files(wheel: Path) -> None:
    """What code finds next to itself at run time: bundle templates, dataset manifest, broker config."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for data in ("turbofed/deploy/templates/install.sh", "turbofed/deploy/templates/turbofed.service",
                 "turbofed/data/manifest.toml", "turbofed/broker_config/mosquitto.conf", "turbofed/py.typed",
                 "turbofed/dashboard/grafana/turbofed-fleet.json"):
        assert data in names, data
    assert not any(n.startswith("turbofed/benchmarks/results") for n in names)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


# Which rooms each room may import (docs/architecture.md). The core is every turbofed.* module
# outside the rooms listed here.
ROOMS = {"edge": "turbofed.edge", "aggregator": "turbofed.aggregator", "dashboard": "turbofed.dashboard",
         "data": "turbofed.data", "benchmarks": "turbofed.benchmarks", "turbofed/simulation": "turbofed.simulation",
         "turbofed/deploy": "turbofed.deploy", "turbofed/store": "turbofed.store"}
FORBIDDEN = {
    "edge": ("turbofed.aggregator", "turbofed.dashboard", "turbofed.benchmarks", "turbofed.simulation",
             "turbofed.deploy", "turbofed.store", "turbofed.data"),
    "aggregator": ("turbofed.edge", "turbofed.dashboard", "turbofed.benchmarks", "turbofed.simulation",
                   "turbofed.deploy", "turbofed.data", "sklearn", "skl2onnx"),
    "dashboard": ("turbofed.edge", "turbofed.aggregator", "turbofed.benchmarks", "turbofed.simulation",
                  "turbofed.deploy", "turbofed.data", "paho"),
    "data": ("turbofed.edge", "turbofed.aggregator", "turbofed.dashboard", "turbofed.benchmarks",
             "turbofed.simulation", "turbofed.deploy", "turbofed.store"),
    "turbofed/store": ("turbofed.edge", "turbofed.aggregator", "turbofed.dashboard", "turbofed.benchmarks",
                       "turbofed.simulation", "turbofed.deploy", "turbofed.data"),
    "turbofed/simulation": ("turbofed.benchmarks", "turbofed.dashboard"),
    "turbofed/deploy": ("turbofed.benchmarks", "turbofed.dashboard", "turbofed.aggregator", "turbofed.simulation"),
}
CORE_FORBIDDEN = tuple(ROOMS.values()) + ("sklearn", "skl2onnx", "streamlit")
# The command line names handlers as strings and imports them lazily; the core modules
# below import no room.
CORE = [*(REPO / "turbofed").glob("*.py"), *(REPO / "turbofed" / "messages").glob("*.py")]


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_rooms_import_only_what_they_may(room: str) -> None:
    bad = []
    for path in sorted((REPO / room).rglob("*.py")):
        for module in _imports(path):
            if module.startswith(FORBIDDEN[room]):
                bad.append(f"{path.relative_to(REPO)} imports {module}")
    assert not bad, "\n".join(bad)


def test_core_imports_no_room() -> None:
    bad = [f"{p.relative_to(REPO)} imports {m}" for p in CORE for m in _imports(p) if m.startswith(CORE_FORBIDDEN)]
    assert not bad, "\n".join(bad)
    names = {p.relative_to(REPO / "turbofed").as_posix() for p in CORE}
    assert names >= {"cli.py", "config.py", "codec.py", "envelope.py", "refusals.py", "messages/__init__.py", "messages/site.py"}
