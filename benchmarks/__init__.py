"""Accuracy and system benchmarks. They print JSON and are not run as tests.

Every benchmark reports the machine next to its figures (`machine_info`) and prints its
result the same way (`emit`).
"""

from __future__ import annotations

import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any


def machine_info(*packages: str) -> dict[str, Any]:
    """What the figures were measured on: platform, CPU, memory, load, and package versions."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    if hasattr(os, "getloadavg"):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)  # other work on the machine skews timings
    try:
        fields: dict[str, str] = {}
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
        name = fields.get("model name") or fields.get("Model") or fields.get("Hardware")  # x86, Raspberry Pi, other ARM
        if name:
            info["cpu"] = name
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as handle:
            info["memory_mb"] = round(int(handle.readline().split()[1]) / 1024)
    except (OSError, ValueError, IndexError):
        pass
    for package in ("numpy", *packages):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    return info


def emit(result: dict[str, Any], json_out: str | Path | None) -> None:
    """Print the result as JSON on stdout, and write it to `json_out` too when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_out:
        Path(json_out).write_text(text + "\n")
