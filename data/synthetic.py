"""A seeded synthetic turbofan fleet in NASA C-MAPSS format.

Why: the demo must run offline (no NASA download), and scale tests need thousands of
engines, more than C-MAPSS has. The generator follows the damage-propagation model of
Saxena et al. (2008, "Damage Propagation Modeling for Aircraft Engine Run-to-Failure
Simulation", the paper behind C-MAPSS), in a reduced form that numpy can vectorise:

* Health parameters. Each engine has efficiency and flow losses (in "margin units":
  1.0 of combined loss uses up the module's whole operability margin) for the HPC and
  the fan. Every engine starts with random initial wear in both modules
  (manufacturing and assembly variation, the paper's d / e0, f0); the faulty module's
  initial wear is what spreads early-life levels along the degradation direction, and
  since every engine fails at the same margin, levels converge at failure (as in FD001).
* Damage propagation. The faulty module's losses grow exponentially,
  e(t) = d_e + rho*u*(exp(a*t^b) - 1) and f(t) = d_f + rho*(1-u)*(exp(a*t^b) - 1),
  i.e. the paper's h(t) = 1 - d - exp(a t^b) shape, with random per-engine a, b
  (b in [1.4, 1.6] as in the paper), rate rho and efficiency/flow split u.
  fault_modes=1: every engine has an HPC fault (like FD001); fault_modes=2: HPC or fan,
  chosen per engine (like FD003). A small AR(1) process noise rides on the health
  parameters (between-flight maintenance makes them locally non-monotonic, paper fig. 5).
* Failure. Health index H(t) = 1 - (e + f) of the faulty module (the other module's
  margin stays nearly full); the engine fails at the first cycle where H <= 0. The
  deterministic trend is solved in closed form, so lengths are known before any sensor
  row is drawn. Lengths are kept within 128..362 cycles, FD001's range.
* Sensors. A fixed response map per sensor (calibrated to the end-of-life shifts of
  FD001 for HPC faults and of FD003's fan-fault engines), slightly nonlinear in the
  consumed margin and with per-engine gain and offset variation, plus a tiny linear
  response to the recorded operating settings, plus Gaussian measurement noise with
  FD001's per-sensor levels. The seven sensors that are constant in FD001 (s1, s5, s6,
  s10, s16, s18, s19) are constant here too. Values are rounded to the decimals NASA
  prints, so files look like C-MAPSS and round-trip exactly.
* Operating condition: one, sea level (settings ~0, ~0, 100 with FD001's small noise).
* Test engines are other engines of the same fleet, cut early the way NASA's are: the
  true RUL is uniform in 5..145 cycles (FD001's and FD003's truths span 7..145) and at
  least 31 cycles are shown (FD001's shortest test run).

Same seed and sizes -> identical arrays. Everything is vectorised over all rows, in
chunks of engines so memory stays bounded for large fleets.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, TextIO

import numpy as np

from turbofed.data.cmapss import N_COLUMNS, EngineRun, Subset
from turbofed.errors import DataError, TurbofedError
from turbofed.layout import N_SENSORS, N_SETTINGS

# --- fleet-level constants ------------------------------------------------------------

MIN_LIFE, MAX_LIFE = 128, 362  # failure cycle range (FD001: 128..362)
MIN_TEST_CYCLES = 31  # NASA's shortest FD001 test trajectory
TEST_RUL = (5, 145)  # test truths are drawn uniformly here (FD001's and FD003's: 7..145)
CONSTANT_SENSORS = (1, 5, 6, 10, 16, 18, 19)  # 1-based, constant in FD001
_INFORMATIVE = np.array([j for j in range(N_SENSORS) if j + 1 not in CONSTANT_SENSORS])
HPC, FAN = 0, 1
_CHUNK_ROWS = 100_000  # rows simulated at a time (bounds temporary memory)

# Per-engine damage-propagation parameters.
_B_RANGE = (1.4, 1.6)  # exponent b (paper, eq. 9)
_TAU = (120.0, 95.0, 0.45)  # characteristic life: shift + scale * lognormal(sigma)
_RHO = (0.14, 0.25)  # damage scale: median, log-sigma (sets how sharp the knee is)
_SPLIT = (0.2, 0.8)  # share of the loss taken by efficiency (rest: flow)
# Initial wear per health parameter, uniform in [0, this) margin units: the faulty
# module's wear is what makes FD001's early-life levels differ along the degradation
# direction (and then converge at failure); the other module's is small.
_INITIAL_WEAR_FAULTY = 0.35
_INITIAL_WEAR_OTHER = 0.02
_WEAR_LIFE_EFFECT = 0.5  # share of the initial wear that shortens life (see _solve_life)
_PROCESS = (0.95, 0.001)  # AR(1) process noise on health parameters: phi, innovation std

# Early-life sensor means of FD001 (first 30 cycles); the nominal "new engine" levels are
# these minus the average initial-wear effect (see _BASE below).
_EARLY = np.array([
    518.67, 642.38, 1586.8, 1402.8, 14.62, 21.61, 553.95, 2388.06, 9056.0, 1.30,
    47.35, 521.91, 2388.06, 8137.4, 8.418, 0.03, 392.26, 2388.0, 100.00, 38.93, 23.360,
])

# Shift of each sensor when a module's combined loss reaches 1 (failure), split into the
# efficiency and the flow part. HPC: FD001's mean end-of-life shift; the core speeds
# (s9, s14) go up with efficiency loss and down with flow loss, which reproduces FD001's
# wide spread of core-speed trends. Fan: FD003's fan-fault engines, where P30, phi and
# the bleeds/coolant flows (s7, s12, s20, s21) rise instead of fall.
_HPC_SIG = np.array([
    0, 1.25, 15.0, 25.5, 0, 0, -2.40, 0.170, 0, 0,
    0.77, -2.05, 0.170, 0, 0.100, 0, 3.9, 0, 0, -0.47, -0.28,
])
_HPC_EFF = _HPC_SIG * np.array([
    1, 1.1, .95, 1.05, 1, 1, .9, 1.1, 1, 1, 1.05, .95, 1.1, 1, .95, 1, 1.05, 1, 1, .95, 1.05,
])
_HPC_FLOW = 2 * _HPC_SIG - _HPC_EFF
_HPC_EFF[[8, 13]] = 135.0, 117.0  # core speeds: efficiency up, flow down
_HPC_FLOW[[8, 13]] = -50.0, -65.0
_FAN_SIG = np.array([
    0, 1.25, 20.3, 28.9, 0, 0, 14.2, 0.58, 56.0, 0,
    1.00, 13.7, 0.58, 45.0, -0.150, 0, 5.3, 0, 0, 0.58, 0.35,
])
_FAN_EFF = _FAN_SIG * np.array([
    1, 1.05, 1.05, .95, 1, 1, .95, 1.05, 1.1, 1, .95, .95, 1.05, 1.1, 1.1, 1, 1.05, 1, 1, .95, .95,
])
_FAN_FLOW = 2 * _FAN_SIG - _FAN_EFF
# (21 sensors, 4 health parameters: HPC eff, HPC flow, fan eff, fan flow). The shifts
# above are measured from early life, when the average engine has already used
# _INITIAL_WEAR_FAULTY of its margin, so the response per margin (from new) is larger.
_RESPONSE = np.stack([_HPC_EFF, _HPC_FLOW, _FAN_EFF, _FAN_FLOW], axis=1)
_RESPONSE /= 1.0 - _INITIAL_WEAR_FAULTY
# Nonlinearity: response scales with (1 + k*m)/(1 + k), m = margin consumed (0..1). The
# core speeds (k = 20, response ~ m^2) move mostly late in life, as in FD001.
_CURVATURE = np.array([0, .4, .3, .3, 0, 0, .2, .5, 20, 0, .3, .2, .5, 20, .3, 0, .3, 0, 0, .2, .2])
# Gaussian measurement noise (FD001 residual std after removing each engine's trend).
_NOISE = np.array([
    0, 0.30, 3.95, 3.92, 0, 0, 0.40, 0.030, 4.1, 0,
    0.10, 0.30, 0.030, 3.09, 0.020, 0, 0.89, 0, 0, 0.099, 0.059,
])
# Per-engine offsets (manufacturing variation), on top of initial wear.
_OFFSET = 0.15 * np.array([
    0, 0.19, 2.0, 3.6, 0, 0, 0.38, 0.036, 6.0, 0,
    0.12, 0.33, 0.036, 6.0, 0.014, 0, 0.55, 0, 0, 0.07, 0.042,
])
_GAIN_SPREAD = 0.02  # per-engine, per-sensor multiplier on the degradation response
# Linear response of the informative sensors to operating-setting deviations from sea
# level (altitude in kft, Mach, TRA %), ISA-lapse-like signs. With FD001's tiny setting
# noise it is far below the measurement noise, as in FD001 (where the residuals do not
# correlate with the settings); the constant sensors do not respond, as in FD001.
_SETTINGS_RESPONSE = np.zeros((N_SENSORS, N_SETTINGS))
_SETTINGS_RESPONSE[[1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 16, 19, 20], 0] = [
    -2.2, -5.6, -6.9, -9.9, -4.2, -17.0, -1.1, -9.0, -4.2, -17.0, 0.01, -1.9, -0.08, -0.05,
]
_SETTINGS_RESPONSE[[1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 16, 19, 20], 1] = [
    8.0, 20.0, 15.0, 60.0, 5.0, 30.0, 5.0, 50.0, 5.0, 30.0, 0.05, 10.0, 4.0, 2.5,
]
_NOMINAL_SETTINGS = np.array([0.0, 0.0, 100.0])
_SETTINGS_NOISE = np.array([0.0022, 0.0003, 0.0])
# Decimals NASA prints per column (unit and cycle are integers).
_SETTING_DECIMALS = (4, 4, 1)
_SENSOR_DECIMALS = (2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 4, 2, 0, 0, 2, 2, 4)

# Nominal levels of a new engine, per fault mode: FD001's early-life means minus the
# mean initial-wear effect of that mode, so both kinds of engine start where FD001's and
# FD003's do (in FD003, fan-fault engines start at the HPC engines' levels). (2, 21)
_MEAN_WEAR = np.array([  # per mode: HPC eff, HPC flow, fan eff, fan flow
    [_INITIAL_WEAR_FAULTY] * 2 + [_INITIAL_WEAR_OTHER] * 2,
    [_INITIAL_WEAR_OTHER] * 2 + [_INITIAL_WEAR_FAULTY] * 2,
]) / 2
_BASE = _EARLY - (_MEAN_WEAR @ _RESPONSE.T) * (
    (1.0 + _CURVATURE * _INITIAL_WEAR_FAULTY) / (1.0 + _CURVATURE)
)


class _Engines:
    """Per-engine random parameters, drawn for the whole fleet at once."""

    def __init__(self, rng: np.random.Generator, n: int, fault_modes: int) -> None:
        self.n = n
        draw = rng.random(n)  # always drawn: fault_modes must not shift the other draws
        self.mode = np.where(draw < 0.5, FAN, HPC) if fault_modes == 2 else np.full(n, HPC)
        self.b = rng.uniform(*_B_RANGE, n)
        self.rho = _RHO[0] * np.exp(_RHO[1] * rng.standard_normal(n))
        self.split = rng.uniform(*_SPLIT, n)
        wear = rng.random((n, 4))  # HPC eff/flow, fan eff/flow
        faulty = (np.arange(4)[None, :] // 2) == self.mode[:, None]
        wear *= np.where(faulty, _INITIAL_WEAR_FAULTY, _INITIAL_WEAR_OTHER)
        # The faulty module's initial wear already points the way its fault will grow
        # (same efficiency/flow split), so an engine's health moves along one line.
        rows, col = np.arange(n), 2 * self.mode
        total = wear[rows, col] + wear[rows, col + 1]
        wear[rows, col], wear[rows, col + 1] = self.split * total, (1.0 - self.split) * total
        self.wear = wear
        self.offset = _OFFSET * rng.standard_normal((n, N_SENSORS))
        self.gain = 1.0 + _GAIN_SPREAD * rng.standard_normal((n, N_SENSORS))
        self.life = np.zeros(n, dtype=np.int64)
        self.a = np.zeros(n)
        todo = np.arange(n)
        for _ in range(1000):  # rejection: keep failure cycles in FD001's range
            tau = _TAU[0] + _TAU[1] * np.exp(_TAU[2] * rng.standard_normal(todo.size))
            self._solve_life(todo, tau)
            life = self.life[todo]
            todo = todo[(life < MIN_LIFE) | (life > MAX_LIFE)]
            if not todo.size:
                break
        else:  # pragma: no cover - about 98% of draws are accepted
            raise RuntimeError("could not draw engine lives in range")

    def faulty_wear(self) -> np.ndarray:
        """Initial (efficiency + flow) loss of each engine's faulty module."""
        cols = 2 * self.mode
        rows = np.arange(self.n)
        return self.wear[rows, cols] + self.wear[rows, cols + 1]

    def _solve_life(self, idx: np.ndarray, tau: np.ndarray) -> None:
        # a is set so that an engine with half its actual initial wear would fail at
        # tau: initial wear eats margin and shortens life (as in the paper), but the
        # wear rate varies more, so early levels only weakly predict life (as in FD001).
        rho, b, wear = self.rho[idx], self.b[idx], self.faulty_wear()[idx]
        a = np.log1p((1.0 - _WEAR_LIFE_EFFECT * wear) / rho) / tau**b
        z_fail = (1.0 - wear) / rho  # exp(a t^b) - 1 at failure
        t_fail = (np.log1p(z_fail) / a) ** (1.0 / b)
        self.a[idx] = a
        self.life[idx] = np.ceil(t_fail).astype(np.int64)  # first cycle with H <= 0


def _simulate_rows(
    rng: np.random.Generator, eng: _Engines, idx: np.ndarray, n_rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Settings (N, 3) and sensors (N, 21) for engines idx, rows 1..n_rows[i] each."""
    k = idx.size
    total = int(n_rows.sum())
    owner = np.repeat(np.arange(k), n_rows)  # local engine index of every row
    starts = np.cumsum(n_rows) - n_rows
    t = (np.arange(total) - np.repeat(starts, n_rows) + 1).astype(float)  # cycle

    # Health parameters: initial wear + exponential growth in the faulty module.
    a, b, rho, u = eng.a[idx][owner], eng.b[idx][owner], eng.rho[idx][owner], eng.split[idx][owner]
    growth = rho * np.expm1(a * t**b)
    health = eng.wear[idx][owner]  # (N, 4)
    rows, col = np.arange(total), 2 * eng.mode[idx][owner]
    health[rows, col] += u * growth
    health[rows, col + 1] += (1.0 - u) * growth
    consumed = health[rows, col] + health[rows, col + 1]  # 1 - H(t), deterministic trend

    # Process noise on the faulty module's efficiency and flow: AR(1) per engine, run
    # on a padded (cycles, engines) grid so every engine's series starts fresh.
    phi, sigma = _PROCESS
    width = int(n_rows.max())
    innov = rng.standard_normal((width, k, 2), dtype=np.float32)
    innov *= sigma
    innov[0] /= np.sqrt(1.0 - phi**2)  # start in the stationary distribution
    for step in range(1, width):
        innov[step] += phi * innov[step - 1]
    valid = np.arange(width)[None, :] < n_rows[:, None]  # (k, width)
    wander = innov.transpose(1, 0, 2)[valid]
    health[rows, col] += wander[:, 0]
    health[rows, col + 1] += wander[:, 1]

    # Recorded settings: sea level with FD001's small noise (TRA is exact).
    settings = np.tile(_NOMINAL_SETTINGS, (total, 1))
    settings[:, :2] += _SETTINGS_NOISE[:2] * rng.standard_normal((total, 2), dtype=np.float32)
    settings = _quantise(settings, _SETTING_DECIMALS)

    # Informative sensors: base + per-engine offset + nonlinear health response +
    # settings response + measurement noise. The others are constant, as in FD001.
    inf = _INFORMATIVE
    live = rng.standard_normal((total, inf.size), dtype=np.float32) * _NOISE[inf]
    live += _BASE[:, inf][eng.mode[idx]][owner]
    live += eng.offset[idx][:, inf][owner]
    curve = (1.0 + _CURVATURE[inf] * consumed[:, None]) / (1.0 + _CURVATURE[inf])
    live += (health @ _RESPONSE[inf].T) * curve * eng.gain[idx][:, inf][owner]
    live += (settings - _NOMINAL_SETTINGS) @ _SETTINGS_RESPONSE[inf].T
    sensors = np.tile(_EARLY, (total, 1))
    sensors[:, inf] = live
    return settings, _quantise(sensors, _SENSOR_DECIMALS)


def _quantise(values: np.ndarray, decimals: tuple[int, ...]) -> np.ndarray:
    """Round each column to NASA's printed decimals (exact round-trip through text)."""
    common = max(set(decimals), key=decimals.count)
    out = np.round(values, common)
    for j, d in enumerate(decimals):
        if d != common:
            out[:, j] = np.round(values[:, j], d)
    out += 0.0  # turns -0.0 into 0.0
    return out


def generate_fleet(
    n_train: int = 100,
    n_test: int = 100,
    seed: int = 0,
    fault_modes: int = 1,
    name: str = "SYN001",
) -> Subset:
    """A C-MAPSS-like subset: n_train runs to failure, n_test cut runs with true RUL.

    Why: an offline stand-in for FD001 (fault_modes=1) or FD003 (fault_modes=2) whose
    size is free, for the demo and for scale tests. Same arguments -> identical arrays.
    """
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got {n_train} and {n_test}")
    if fault_modes not in (1, 2):
        raise ValueError(f"fault_modes must be 1 (HPC) or 2 (HPC or fan), got {fault_modes}")
    if not name or Path(name).name != name:
        raise ValueError(f"name must be a plain file-name part, got {name!r}")
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    eng = _Engines(rng, n, fault_modes)
    life = eng.life
    # Test engines stop early, the way NASA's do: truth uniform in TEST_RUL, but at
    # least MIN_TEST_CYCLES shown. Only the cycles they show are simulated.
    truth = rng.integers(TEST_RUL[0], TEST_RUL[1] + 1, n)
    cut = np.maximum(life - truth, MIN_TEST_CYCLES)
    n_rows = np.where(np.arange(n) < n_train, life, cut)

    runs: list[EngineRun] = []
    start = 0
    while start < n:
        stop = start + 1
        budget = _CHUNK_ROWS - n_rows[start]
        # Grow the chunk while it fits the row budget.
        csum = np.cumsum(n_rows[start + 1 :])
        stop += int(np.searchsorted(csum, budget, side="right"))
        idx = np.arange(start, stop)
        settings, sensors = _simulate_rows(rng, eng, idx, n_rows[idx])
        bounds = np.cumsum(n_rows[idx])[:-1]
        for i, st, se in zip(idx, np.split(settings, bounds), np.split(sensors, bounds)):
            test = i >= n_train
            runs.append(
                EngineRun(
                    unit=int(i - n_train + 1 if test else i + 1),
                    cycles=np.arange(1, n_rows[i] + 1, dtype=np.int64),
                    settings=st,
                    sensors=se,
                    rul_at_end=float(life[i] - cut[i]) if test else 0.0,
                )
            )
        start = stop
    return Subset(name=name, train=runs[:n_train], test=runs[n_train:] if n_test else None)


# --- files ------------------------------------------------------------------------------

_DECIMALS = (0, 0) + _SETTING_DECIMALS + _SENSOR_DECIMALS
_WRITE_ROWS = 50_000  # rows formatted at a time (bounds the text held in memory)


def _blocks(runs: list[EngineRun]) -> Iterator[np.ndarray]:
    """The runs' rows in C-MAPSS layout, a few tens of thousands of rows at a time."""
    batch: list[np.ndarray] = []
    size = 0
    for run in runs:
        batch.append(run.rows())
        size += len(run)
        if size >= _WRITE_ROWS:
            yield np.vstack(batch)
            batch, size = [], 0
    if batch:
        yield np.vstack(batch)


def _row_format(runs: list[EngineRun]) -> str:
    """NASA's decimals for every column that they hold exactly, else repr (exact)."""
    exact = np.ones(N_COLUMNS, dtype=bool)
    for table in _blocks(runs):
        if table.shape[1] != N_COLUMNS or not np.all(np.isfinite(table)):
            raise ValueError(f"runs must hold {N_COLUMNS} finite numbers a row")
        for j, d in enumerate(_DECIMALS):
            exact[j] &= np.array_equal(np.round(table[:, j], d) + 0.0, table[:, j])
    fmts = [("%d" if d == 0 else f"%.{d}f") if ok else "%r" for d, ok in zip(_DECIMALS, exact)]
    return " ".join(fmts) + "\n"


def _write_runs(handle: TextIO, runs: list[EngineRun]) -> None:
    line = _row_format(runs)
    for table in _blocks(runs):
        handle.write("".join(line % tuple(row) for row in table.tolist()))


def _write_rul(handle: TextIO, runs: list[EngineRun]) -> None:
    for run in runs:
        value = float(run.rul_at_end)
        handle.write(("%d" % value if value.is_integer() else repr(value)) + "\n")


def write_subset(subset: Subset, folder: Path) -> list[Path]:
    """Write train_/test_/RUL_<name>.txt so `load_subset(name, folder)` reads it back.

    Why atomic: replays and agents may open these files at any moment. Each file is
    written to a temporary file in the same folder and moved in with os.replace only
    once all of them are complete, so a reader sees old or new files, never a half one.
    A subset without test runs writes only the train file and removes a stale test/RUL
    pair of the same name, so new training data is never paired with old test data.
    """
    if not subset.train:
        raise ValueError("a subset needs at least one training run")
    if not subset.name or Path(subset.name).name != subset.name:
        raise ValueError(f"subset name must be a plain file-name part, got {subset.name!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[Path, Callable[[TextIO], None]]] = [
        (folder / f"train_{subset.name}.txt", lambda h: _write_runs(h, subset.train))
    ]
    test_path, rul_path = folder / f"test_{subset.name}.txt", folder / f"RUL_{subset.name}.txt"
    if subset.test:
        test = subset.test
        jobs.append((test_path, lambda h: _write_runs(h, test)))
        jobs.append((rul_path, lambda h: _write_rul(h, test)))
    staged: list[tuple[str, Path]] = []
    try:
        for path, write in jobs:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
            staged.append((tmp, path))
            with os.fdopen(fd, "w", encoding="ascii", newline="\n") as handle:
                write(handle)
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if not subset.test:
        test_path.unlink(missing_ok=True)
        rul_path.unlink(missing_ok=True)
    return [path for path, _ in jobs]


def run_cli(args: argparse.Namespace) -> int:
    """`turbofed data synth`: write a synthetic fleet (engines train + engines test)."""
    if args.engines < 1:
        raise TurbofedError(f"--engines must be at least 1, got {args.engines}")
    try:
        subset = generate_fleet(
            n_train=args.engines,
            n_test=args.engines,
            seed=args.seed,
            fault_modes=args.fault_modes,
            name=args.name,
        )
    except ValueError as exc:
        raise TurbofedError(str(exc)) from None
    try:
        paths = write_subset(subset, Path(args.out))
    except OSError as exc:
        raise DataError(f"{args.out}: cannot write the synthetic fleet: {exc}") from None
    rows = sum(len(r) for r in subset.train) + sum(len(r) for r in subset.test or [])
    print(
        f"wrote synthetic fleet {subset.name} ({args.engines} train + {args.engines} test "
        f"engines, {rows} rows, seed {args.seed}, fault modes {args.fault_modes}):"
    )
    for path in paths:
        print(f"  {path}")
    return 0
