"""Client-level differential privacy (aggregator/privacy.py): clipping, noise, accounting,
the budget stopping the fleet, and the [privacy] table's errors."""

from __future__ import annotations

import math
import statistics
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dp_accounting")

import dp_accounting  # noqa: E402

from turbofed.aggregator.privacy import (  # noqa: E402
    DPFedAvg,
    calibrate_noise,
    gaussian_epsilon,
    noised_mean,
    private_strategy,
)
from turbofed.aggregator.strategies import FedAvg, SiteUpdate, make_strategy  # noqa: E402
from turbofed.config import ModelSettings, PrivacySettings, load_fleet_config  # noqa: E402
from turbofed.dpnoise import noised_delta  # noqa: E402
from turbofed.errors import ConfigError  # noqa: E402


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle and Wang, "Improving the Gaussian Mechanism for Differential Privacy: Analytical
    Calibration and Optimal Denoising", ICML 2018, Theorem 8: a Gaussian of standard deviation
    sigma on a sensitivity-1 query is (eps, delta)-DP iff
    Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma) - eps sigma) <= delta. Bisection on eps."""
    phi = statistics.NormalDist().cdf

    def delta_of(eps: float) -> float:
        return phi(0.5 / sigma - eps * sigma) - math.exp(eps) * phi(-0.5 / sigma - eps * sigma)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if delta_of(mid) <= delta else (mid, hi)
    return hi


# --- accounting ------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma, rounds", [(2.0, 1), (4.0, 4)])
def test_pld_epsilon_matches_the_analytic_gaussian_mechanism(sigma: float, rounds: int) -> None:
    """T Gaussian rounds with every site (q = 1) are exactly one Gaussian of sigma / sqrt(T);
    PLD accounting must land on the closed form (it rounds pessimistically: a little above)."""
    published = analytic_gaussian_epsilon(sigma / math.sqrt(rounds), 1e-5)
    ours = gaussian_epsilon(sigma, rounds, 1e-5, "pld")
    assert published <= ours <= published * 1.01


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_accountant_equals_the_library_for_the_same_mechanism(accountant: str) -> None:
    sigma, rounds, delta = 1.3, 25, 1e-5
    acc = dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()
    for _ in range(rounds):  # composed one round at a time, as a fleet spends it
        acc.compose(dp_accounting.PoissonSampledDpEvent(1.0, dp_accounting.GaussianDpEvent(sigma)))
    assert gaussian_epsilon(sigma, rounds, delta, accountant) == pytest.approx(acc.get_epsilon(delta), rel=1e-3)


def test_rdp_is_an_upper_bound_close_to_the_exact_value() -> None:
    exact = analytic_gaussian_epsilon(1.0 / math.sqrt(10), 1e-5)
    assert exact < gaussian_epsilon(1.0, 10, 1e-5, "rdp") < 1.2 * exact


def test_calibration_reaches_the_target() -> None:
    sigma = calibrate_noise(4.0, 50, 1e-5)
    assert gaussian_epsilon(sigma, 50, 1e-5) <= 4.0
    assert gaussian_epsilon(sigma * 0.99, 50, 1e-5) > 4.0
    assert gaussian_epsilon(1.0, 0, 1e-5) == 0.0


# --- clipping and noise ----------------------------------------------------------------------


def dp(noise: float, expected: int, clip_norm: float = 1.0, seed: int = 7) -> DPFedAvg:
    return DPFedAvg(FedAvg(), PrivacySettings(clip_norm=clip_norm, noise_multiplier=noise or 1.0, seed=seed), noise, expected)


def test_clipping_bounds_each_site_by_hand() -> None:
    """C = 1, two sites expected, no noise: delta (3, 4) (norm 5) becomes (0.6, 0.8), (0.3, 0)
    is kept; the mean is ((0.6 + 0.3) / 2, 0.8 / 2) whatever the sample counts say."""
    current = {"w": np.zeros(2, dtype=np.float32)}
    strategy = dp(0.0, 2)
    out = strategy.aggregate(current, [SiteUpdate("a", {"w": np.array([3.0, 4.0], np.float32)}, 10**6),
                                       SiteUpdate("b", {"w": np.array([0.3, 0.0], np.float32)}, 1)])
    np.testing.assert_allclose(out["w"], [0.45, 0.4], atol=1e-6)
    assert strategy.last_report["a"]["action"] == "clipped" and strategy.last_report["a"]["norm"] == pytest.approx(5.0)
    assert strategy.last_report["b"]["action"] == "kept" and strategy.dp_rounds == 1
    # One site, however far it moves, shifts the mean by at most C / n.
    far = strategy.aggregate(current, [SiteUpdate("a", {"w": np.array([3e6, -4e6], np.float32)}, 1),
                                       SiteUpdate("b", {"w": np.array([0.3, 0.0], np.float32)}, 1)])
    assert np.linalg.norm(far["w"] - out["w"]) <= 1.0 / 2 * (1 + 1e-6) * 2  # both clipped to norm 1: |a - a'| <= 2C / n


def test_noise_has_the_stated_standard_deviation() -> None:
    """sigma C on the sum, divided by n: per coordinate sigma C / n (200,000 draws, fixed seed)."""
    sigma, clip_norm, n, d = 1.7, 0.5, 4, 200_000
    current = {"w": np.zeros(d, dtype=np.float32)}
    strategy = dp(sigma, n, clip_norm)
    out = strategy.aggregate(current, [SiteUpdate(s, {"w": np.zeros(d, np.float32)}, 1) for s in "abcd"])["w"]
    assert abs(float(np.mean(out))) < 5 * sigma * clip_norm / n / math.sqrt(d)
    assert float(np.std(out)) == pytest.approx(sigma * clip_norm / n, rel=0.01)
    raw = noised_mean(np.zeros((3, d)), 2.0, 1, np.random.default_rng(1))
    assert float(np.std(raw)) == pytest.approx(2.0, rel=0.01)


def test_noise_is_unseeded_by_default() -> None:
    settings = PrivacySettings(clip_norm=1.0, noise_multiplier=1.0)
    a, b = (DPFedAvg(FedAvg(), settings, 1.0, 1) for _ in range(2))
    assert a.rng.normal() != b.rng.normal()


def test_distributed_mode_sites_clip_and_noise_the_aggregator_tops_up() -> None:
    """Each site: clip to C, add N(0, sigma^2 C^2 / n). The aggregator adds the missing sites'
    share, so the sum always carries N(0, sigma^2 C^2): with 2 of 4 sites, sigma C sqrt(2/4)."""
    from turbofed.messages import RoundAnnouncement

    sigma, clip_norm, n, d = 2.0, 0.5, 4, 200_000
    settings = PrivacySettings(clip_norm=clip_norm, noise_multiplier=sigma, mode="distributed", seed=3)
    strategy = private_strategy(FedAvg(), settings, 10, n)
    ask = strategy.site_noise()
    assert (ask.clip_norm, ask.noise_std) == (clip_norm, pytest.approx(sigma * clip_norm / 2))
    announced = RoundAnnouncement(1, announce_id="a", model_version=0, deadline=1.0, settings=ModelSettings(), dp=ask)
    assert RoundAnnouncement.from_payload(announced.to_payload()).dp == ask
    current = {"w": np.zeros(2, np.float32)}
    site = noised_delta(current, {"w": np.array([3.0, 4.0], np.float32)}, 1.0, 0.0, np.random.default_rng(0))
    np.testing.assert_allclose(site["w"], [0.6, 0.8], atol=1e-6)  # clipped by hand, no noise
    noisy = noised_delta({"w": np.zeros(d, np.float32)}, {"w": np.zeros(d, np.float32)}, 1.0, ask.noise_std, np.random.default_rng(1))
    assert float(np.std(noisy["w"])) == pytest.approx(ask.noise_std, rel=0.01)
    zero = {"w": np.zeros(d, np.float32)}
    out = strategy.aggregate(zero, [SiteUpdate(s, {"w": np.zeros(d, np.float32)}, 1) for s in "ab"])["w"]
    assert float(np.std(out)) == pytest.approx(sigma * clip_norm * math.sqrt(2 / 4) / n, rel=0.01)
    big = strategy.aggregate(zero, [SiteUpdate(s, {"w": np.full(d, 5.0, np.float32)}, 1) for s in "abcd"])["w"]
    assert float(np.mean(big)) == pytest.approx(5.0) and float(np.std(big)) < 1e-6  # all answered: nothing added, nothing clipped


def test_only_the_fedavg_family_and_central_mode() -> None:
    settings = PrivacySettings(clip_norm=1.0, noise_multiplier=1.0)
    for name in ("median", "multi-krum", "trimmed-mean", "filtered-fedavg", "clipped-fedavg"):
        with pytest.raises(ConfigError, match=r"^f.toml: \[privacy\]: differential privacy needs the sum of clipped updates"):
            private_strategy(make_strategy(name), settings, 10, 4, "f.toml: [privacy]")
    with pytest.raises(ConfigError, match="clip = 2 must be 0 with"):
        private_strategy(make_strategy("fedavgm", {"clip": 2.0}), settings, 10, 4)
    fedadam = private_strategy(make_strategy("fedadam"), PrivacySettings(clip_norm=1.0, target_epsilon=8.0), 20, 4)
    assert fedadam.epsilon(20) <= 8.0 and fedadam.name == "fedadam" and "beta1" in fedadam.parameters()


# --- [privacy] in fleet.toml -----------------------------------------------------------------

FLEET = 'insecure_unsigned = true\nsites = ["a", "b"]\nstore = "r.sqlite"\nregistry = "reg"\n'


def test_privacy_table(tmp_path: Path) -> None:
    (tmp_path / "f.toml").write_text(FLEET + "[privacy]\nclip_norm = 2\ntarget_epsilon = 8\n")
    p = load_fleet_config(tmp_path / "f.toml").privacy
    assert (p.clip_norm, p.target_epsilon, p.delta, p.mode, p.noise_multiplier) == (2.0, 8.0, 1e-5, "central", None)
    (tmp_path / "g.toml").write_text(FLEET)
    assert load_fleet_config(tmp_path / "g.toml").privacy is None


@pytest.mark.parametrize("table, message", [
    ("noise_multiplier = 1.0\n", r"missing key\(s\) clip_norm"),
    ("clip_norm = 0\nnoise_multiplier = 1.0\n", r"\[privacy\] clip_norm must be a number > 0"),
    ("clip_norm = 1\n", "give exactly one of noise_multiplier"),
    ("clip_norm = 1\nnoise_multiplier = 1.0\ntarget_epsilon = 4\n", "give exactly one of noise_multiplier"),
    ("clip_norm = 1\nnoise_multiplier = -1\n", r"\[privacy\] noise_multiplier must be a number > 0"),
    ("clip_norm = 1\nnoise_multiplier = 1\ndelta = 0.5\n", r"\[privacy\] delta must be a number > 0 and <= 0.1"),
    ("clip_norm = 1\nnoise_multiplier = 1\nmode = \"local\"\n", r"\[privacy\] mode must be one of 'central', 'distributed'"),
    ("clip_norm = 1\nnoise_multiplier = 1\nepsilon_budget = 0\n", r"\[privacy\] epsilon_budget must be a number > 0"),
    ("clip_norm = 1\ntarget_epsilon = 8\nepsilon_budget = 4\n", r"epsilon_budget \(4\) is below target_epsilon \(8\)"),
    ("clip_norm = 1\nnoise_multiplier = 1\nexpected_sites = 3\n", r"expected_sites must be at most the number of sites \(2\)"),
    ("clip_norm = 1\nnoise_multiplier = 1\nsigma = 3\n", r"\[privacy\] unknown key\(s\) sigma"),
    ("clip_norm = 1\nnoise_multiplier = 1\naccountant = \"moments\"\n", r"\[privacy\] accountant must be one of"),
])
def test_privacy_errors_name_file_and_key(tmp_path: Path, table: str, message: str) -> None:
    (tmp_path / "f.toml").write_text(FLEET + "[privacy]\n" + table)
    with pytest.raises(ConfigError, match=message) as info:
        load_fleet_config(tmp_path / "f.toml")
    assert str(info.value).startswith(str(tmp_path / "f.toml")) and "\n" not in str(info.value)


# --- the aggregator: epsilon per round, the budget stops training, restarts ------------------


class Client:
    """Records every publish (announcements too); stands in for paho in `Aggregator.run`."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> object:
        self.published.append((topic, payload))
        return type("Info", (), {"wait_for_publish": lambda self, t=None: None})()

    def disconnect(self) -> None:
        pass

    def loop_stop(self) -> None:
        pass


def test_spent_budget_stops_training_and_survives_a_restart(tmp_path: Path) -> None:
    """sigma 2, budget for exactly two noised rounds: the third is not run, the aggregator
    says so (event, done announcement); a restarted aggregator recomputes the same epsilon."""
    from tests.inprocess import config, run_round, save_versions
    from turbofed.aggregator.service import Aggregator
    from turbofed.codec import read_weights
    from turbofed.config import StrategySettings
    from turbofed.messages import RoundAnnouncement
    from turbofed.store import open_store

    budget = (gaussian_epsilon(2.0, 2, 1e-5) + gaussian_epsilon(2.0, 3, 1e-5)) / 2
    cfg = config(tmp_path, strategy=StrategySettings("fedavg"),
                 privacy=PrivacySettings(clip_norm=1.0, noise_multiplier=2.0, epsilon_budget=budget, seed=1))
    save_versions(tmp_path / "registry", range(1, 2))
    aggregator, client = Aggregator(cfg), Client()
    timer = threading.Timer(1.0, threading.Event().set)
    try:
        aggregator.client = client
        for _ in range(2):
            base = read_weights(aggregator.model)
            run_round(aggregator, {s: ({n: w + 0.01 for n, w in base.items()}, 100) for s in ("site1", "site2")})
        assert aggregator.version == 3 and aggregator.dp.dp_rounds == 2
        stop = threading.Event()
        timer = threading.Timer(1.0, stop.set)
        timer.start()  # resumed from v1: statistics and model known, run() goes straight to rounds
        aggregator.run(stop)  # closes the store and the registry when stopped
        assert aggregator.version == 3  # no third round was announced or merged
        announcements = [RoundAnnouncement.from_payload(p) for t, p in client.published if t.endswith("/round")]  # unsigned fleet
        assert announcements and announcements[-1].done
        with open_store(cfg.store) as store:
            events = store.events(100)
        privacy = [e["detail"] for e in events if e["kind"] == "privacy"]
        assert [d["round"] for d in privacy] == [3, 2]  # newest first
        assert privacy[0]["epsilon"] == pytest.approx(gaussian_epsilon(2.0, 2, 1e-5))
        (spent,) = [e["detail"] for e in events if e["kind"] == "privacy_budget_spent"]
        assert spent["dp_rounds"] == 2 and spent["epsilon_budget"] == pytest.approx(budget)
        from turbofed.dashboard.views import privacy_status

        status = privacy_status(events)
        assert status["spent"] and status["epsilon"] == pytest.approx(privacy[0]["epsilon"])
    finally:
        timer.cancel()
    again = Aggregator(cfg)
    try:
        assert again.dp.dp_rounds == 2 and again.dp.epsilon() == pytest.approx(gaussian_epsilon(2.0, 2, 1e-5))
        assert not again.dp.budget_allows_another()
    finally:
        again.store.close()
        again.registry.close()
