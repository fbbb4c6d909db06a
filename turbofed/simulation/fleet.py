"""Which site owns which engine, and what the engine is called on the wire.

The replay, the in-process benchmark and the demo's site configs all call this, so an
engine belongs to the same site everywhere. Engine ids name the subset, the part and the
unit (`FD001-test-17`), unique across a mixed fleet.
"""

from __future__ import annotations

from dataclasses import dataclass

from turbofed.data.cmapss import EngineRun

ASSIGN_MODES = ("contiguous", "round-robin", "subset")


@dataclass(frozen=True)
class FleetEngine:
    site: str
    engine: str
    part: str  # "train" (runs to failure) or "test" (stops early; truth revealed at the end)
    run: EngineRun


def site_names(n_sites: int) -> list[str]:
    return [f"site{i + 1}" for i in range(n_sites)]


def engine_id(subset: str, part: str, unit: int) -> str:
    return f"{subset}-{part}-{unit}"


def assign(runs_by_subset: dict[str, list[EngineRun]], n_sites: int, part: str, mode: str = "round-robin") -> list[FleetEngine]:
    """Give every engine to one site.

    round-robin: engine k of each subset goes to site k mod N; contiguous: each site a
    block of consecutive units; subset: the sites are split among the subsets (a non-IID
    fleet, e.g. half FD001 and half FD003), round-robin within each group. Several subsets
    always assign by subset.
    """
    if mode not in ASSIGN_MODES:
        raise ValueError(f"unknown assignment {mode!r}; choose one of {', '.join(ASSIGN_MODES)}")
    names = site_names(n_sites)
    subsets = list(runs_by_subset)
    if len(subsets) > 1:
        mode = "subset"
    if n_sites < len(subsets):
        raise ValueError(f"{n_sites} sites cannot cover {len(subsets)} subsets")
    out = []
    for k, subset in enumerate(subsets):
        group = [s for i, s in enumerate(names) if i * len(subsets) // n_sites == k] if mode == "subset" else names
        runs = runs_by_subset[subset]
        for j, run in enumerate(runs):
            site = group[j * len(group) // len(runs)] if mode == "contiguous" else group[j % len(group)]
            out.append(FleetEngine(site, engine_id(subset, part, run.unit), part, run))
    return out
