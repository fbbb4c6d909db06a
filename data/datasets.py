"""Datasets as the benchmarks, the replay and the demo use them: training runs per subset,
and one evaluation set per subset (NASA's official test engines where present, else a
hold-out of training engines cut the way NASA cut its test engines)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from turbofed.data.cmapss import EngineRun, Subset, load_subset
from turbofed.data.synthetic import generate_fleet
from turbofed.metrics import nasa_cut_rul

HOLDOUT_FRACTION = 0.2
# A subset without NASA's test file is scored on a hold-out of its training engines drawn with
# this seed whatever the run's seed: one fixed test set, so that no run at another seed (a tuning
# run's training or validation engines) ever touches it.
TEST_HOLDOUT_SEED = 0


@dataclass
class EvalSet:
    """Test engines of one subset, and whether they are NASA's or held out of train."""

    subset: str
    runs: list[EngineRun]
    kind: str  # "official-test" | "holdout-from-train"


def cut_like_nasa(runs: list[EngineRun], rng: np.random.Generator) -> list[EngineRun]:
    """Each run-to-failure cut before failure the way NASA cut its test engines."""
    cut = []
    for run in runs:
        cut.append(run.cut(max(1, len(run) - int(nasa_cut_rul(len(run), rng)))))
    return cut


def draw_engines(runs: list[EngineRun], n_out: int, rng: np.random.Generator) -> tuple[list[EngineRun], list[EngineRun]]:
    """(kept, held out), both in their original order: `n_out` whole engines drawn by one
    permutation from `rng` (the one seeded draw every engine split uses)."""
    held = set(rng.permutation(len(runs))[:n_out].tolist())
    return [r for i, r in enumerate(runs) if i not in held], [r for i, r in enumerate(runs) if i in held]


def split_engines(runs: list[EngineRun], seed: int, fraction: float = HOLDOUT_FRACTION) -> tuple[list[EngineRun], list[EngineRun]]:
    """(kept, held-out cut like NASA's test): a seeded `fraction` of whole engines held out."""
    rng = np.random.default_rng(seed)
    kept, held = draw_engines(runs, max(1, int(round(fraction * len(runs)))), rng)
    return kept, cut_like_nasa(held, rng)


def holdout(subset: Subset, seed: int, fraction: float = HOLDOUT_FRACTION) -> tuple[list[EngineRun], EvalSet]:
    """Hold out a seeded fraction of training engines, each cut before failure like NASA's test set."""
    kept, cut = split_engines(subset.train, seed, fraction)
    return kept, EvalSet(subset.name, cut, "holdout-from-train")


def load_dataset(dataset: str, data_dir: str | None, seed: int) -> tuple[dict[str, list[EngineRun]], list[EvalSet]]:
    """Training runs per subset and one evaluation set per subset (official test if present)."""
    train, evals = {}, []
    for name in dataset.split("+"):
        if name.upper().startswith("SYN"):
            subset = generate_fleet(n_train=100, n_test=100, seed=seed, name=name.upper())
        else:
            subset = load_subset(name.upper(), data_dir)
        if subset.test:
            train[subset.name], ev = subset.train, EvalSet(subset.name, subset.test, "official-test")
        else:
            train[subset.name], ev = holdout(subset, TEST_HOLDOUT_SEED)
        evals.append(ev)
    return train, evals
