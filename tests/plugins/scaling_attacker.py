"""Compromised sites, for the live attack tests only (never installed): real agent processes
that train honestly and then lie. `ScalingAttacker` sends its weights multiplied by 1000 (the
scale attack of `turbofed bench attack`); `InflatingAttacker` claims 2^53 - 1 training
samples. Their messages are signed with the site's real key, as a stolen device's would be:
signatures stop outsiders; the aggregator's strategy and weight caps have to stop these.

Run as `python -m tests.plugins.scaling_attacker SITE.toml [inflate]` with the repository on PYTHONPATH.
"""

from __future__ import annotations

import signal
import sys
import threading

import onnx

from turbofed.codec import read_weights, replace_weights
from turbofed.config import load_site_config
from turbofed.edge.agent import EdgeAgent
from turbofed.messages import RoundAnnouncement

SCALE = 1000.0


class ScalingAttacker(EdgeAgent):
    """An EdgeAgent whose every model update is its honest update x SCALE."""

    def _send(self, ann: RoundAnnouncement, kind: str, body: bytes, samples: int) -> None:
        if kind == "update":
            model = onnx.load_model_from_string(body)
            scaled = {n: (w * SCALE).astype(w.dtype) for n, w in read_weights(model).items()}
            body = replace_weights(model, scaled).SerializeToString()
        super()._send(ann, kind, body, samples)


class InflatingAttacker(EdgeAgent):
    """An EdgeAgent whose every update claims the largest sample count an envelope carries."""

    def _send(self, ann: RoundAnnouncement, kind: str, body: bytes, samples: int) -> None:
        super()._send(ann, kind, body, INFLATED if kind == "update" else samples)


INFLATED = 2**53 - 1


def main(argv: list[str]) -> int:
    attacker = InflatingAttacker if argv[1:] == ["inflate"] else ScalingAttacker
    agent = attacker(load_site_config(argv[0]))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent.start()
    agent.run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
