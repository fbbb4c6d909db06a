"""turbofed: federated remaining-useful-life learning for turbofan fleets.

This package is the shared contract (errors, metrics, weight codec, protocol) and the
command-line front door. It never imports scikit-learn, `edge` or `aggregator`.
"""

__version__ = "0.1.0"
