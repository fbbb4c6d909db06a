"""What new engine ids cost an edge agent: RSS and traced memory before and after one
reading for each of N new engine ids (issue #12: 10,000 new ids took an agent from 272 to
538 MB). The agent predicts with both models, as in service; nothing is published.

    python benchmarks/edge_memory.py --engines 10000 [--max-engines 10000]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from turbofed.config import ModelSettings, SiteConfig
from turbofed.layout import N_SENSORS
from turbofed.messages import SensorReading
from turbofed.spec import FeatureSpec, n_features
from turbofed.topics import Topics

if TYPE_CHECKING:
    from turbofed.edge.agent import EdgeAgent

SPEC_SENSORS = (1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 16, 19, 20)  # the 14 informative C-MAPSS FD001 sensors


def rss_mb() -> float:
    """Current resident set size (Linux /proc), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def serving_agent(state_dir: Path, **config: object) -> EdgeAgent:
    """A training-profile agent with a local and a federated model, ready to predict."""
    from turbofed.edge.agent import EdgeAgent
    from turbofed.edge.inference import OnnxPredictor
    from turbofed.edge.learner import RulModel

    agent = EdgeAgent(SiteConfig(site="s1", state_dir=str(state_dir), insecure_unsigned=True, **config))
    f = n_features(len(SPEC_SENSORS))
    spec = FeatureSpec(SPEC_SENSORS, 30, (0.0,) * f, (1.0,) * f)
    model = RulModel(ModelSettings(hidden=(16,)), spec).to_onnx()
    agent.fleet_spec = agent.local_spec = spec
    agent.global_model, agent.global_version = model, 0
    agent.fed_predictor = agent.local_predictor = OnnxPredictor(model)
    return agent


def feed_new_engines(agent: EdgeAgent, n: int, prefix: str = "new") -> None:
    """One reading for each of `n` engine ids the agent has never seen (pending reports dropped as they come)."""
    topics = Topics()
    sensors = tuple(float(x) for x in np.linspace(1.0, 600.0, N_SENSORS))
    payload = SensorReading(1, (0.0, 0.0, 100.0), sensors).to_payload()
    for i in range(n):
        agent.handle(topics.sensors("s1", f"{prefix}-{i}"), payload)
        if i % 500 == 0:
            agent.pending_rows.clear()
    agent.pending_rows.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, default=10_000)
    parser.add_argument("--max-engines", type=int, default=None, help="the site's max_engines (default: SiteConfig's)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        extra = {} if args.max_engines is None else {"max_engines": args.max_engines}
        agent = serving_agent(Path(tmp) / "state", **extra)
        feed_new_engines(agent, 10, prefix="warm")  # first predictions load onnxruntime's buffers
        before = rss_mb()
        tracemalloc.start()
        feed_new_engines(agent, args.engines)
        traced, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        after = rss_mb()
        out = {"engines_fed": args.engines, "max_engines": agent.config.max_engines, "tracked": len(agent.engines),
               "refused_too_many": agent.counters["rejected.too_many_engines"], "rss_mb_before": round(before, 1),
               "rss_mb_after": round(after, 1), "traced_mb": round(traced / 2**20, 1)}
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
