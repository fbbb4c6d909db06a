"""The dashboard: every page renders (empty, missing and filled stores), shows the store's
numbers, and its policy economics match hand-computed values."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from turbofed.dashboard import charts, common, economics, launch, views
from turbofed.dashboard.samples import T0, write_small_store
from turbofed.store import StoreError
from turbofed.store.sqlite import SqliteStore

APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
PAGES = {"Fleet": None, "Federated vs local": "screens/federated.py", "Rounds": "screens/rounds.py",
         "Maintenance economics": "screens/economics.py"}
TIMEOUT = 60


# --- fixtures and helpers --------------------------------------------------------------------

@pytest.fixture
def small_store(tmp_path: Path) -> Path:
    path = tmp_path / "results.sqlite"
    with SqliteStore(path) as store:
        write_small_store(store)
    return path


@pytest.fixture
def empty_store(tmp_path: Path) -> Path:
    path = tmp_path / "empty.sqlite"
    SqliteStore(path).close()
    return path


def render(store: Path | str, page: str = "Fleet", **widgets: Any) -> AppTest:
    """Run the app on `store` and open `page`; `widgets` are session-state values set first."""
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.session_state[common.STORE_KEY] = str(store)
    at.run()
    if PAGES[page]:
        at.switch_page(PAGES[page]).run()
    return at


def no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def metric(at: AppTest, label: str) -> str:
    found = [m.value for m in at.metric if m.label == label]
    assert found, f"no metric {label!r} among {[m.label for m in at.metric]}"
    return found[0]


def frame(at: AppTest, *columns: str) -> pd.DataFrame:
    """The first dataframe on the page that has all `columns`."""
    for df in at.dataframe:
        value = df.value
        if all(c in value.columns for c in columns):
            return value.reset_index(drop=True)
    raise AssertionError(f"no dataframe with columns {columns}: {[list(d.value.columns) for d in at.dataframe]}")


def texts(at: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "info", "error", "caption", "success") for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


def same(a: Any, b: Any) -> bool:
    """Equal, with None and NaN both meaning "no value"."""
    missing = lambda v: v is None or (isinstance(v, float) and math.isnan(v))  # noqa: E731
    return (missing(a) and missing(b)) or a == b


# --- empty, missing and broken stores ----------------------------------------------------------

@pytest.mark.parametrize("page", list(PAGES))
def test_empty_store_shows_how_to_produce_data(empty_store: Path, page: str) -> None:
    at = render(empty_store, page)
    no_exception(at)
    assert at.title[0].value == page
    assert "is empty" in texts(at) and "turbofed demo" in texts(at)


@pytest.mark.parametrize("page", list(PAGES))
def test_missing_store_is_not_created(tmp_path: Path, page: str) -> None:
    path = tmp_path / "nowhere" / "results.sqlite"
    at = render(path, page)
    no_exception(at)
    assert "No results store at" in texts(at) and "turbofed demo" in texts(at)
    assert not path.exists() and not path.parent.exists()  # a typo in --store leaves nothing behind


def test_broken_store_is_an_error_message_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    at = render(path)
    no_exception(at)
    assert at.error and "Cannot read the results store" in at.error[0].value


def test_unconfigured_influx_store_is_an_error_message(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("URL", "TOKEN", "ORG", "BUCKET"):
        monkeypatch.delenv(f"TURBOFED_INFLUX_{name}", raising=False)
    at = render("influxdb", "Rounds")
    no_exception(at)
    assert at.error and "Cannot read the results store `influxdb`" in at.error[0].value


def test_a_read_failing_mid_page_is_an_error_message(small_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server store can fail between two reads: the page says so and retries on refresh."""
    def down(self: SqliteStore) -> list[dict[str, Any]]:
        raise StoreError("InfluxDB query latest_predictions failed: connection refused")

    monkeypatch.setattr(SqliteStore, "latest_predictions", down)
    at = render(small_store)
    no_exception(at)
    assert "Reading the results store failed" in at.error[0].value and "connection refused" in at.error[0].value


def test_store_appearing_later_is_picked_up(tmp_path: Path) -> None:
    """Start the dashboard before the demo: the next refresh finds the new store."""
    path = tmp_path / "results.sqlite"
    at = render(path)
    assert "No results store" in texts(at)
    with SqliteStore(path) as store:
        write_small_store(store)
    at.run()
    no_exception(at)
    assert metric(at, "Critical") == "2"


# --- filled store: every page, the store's numbers ------------------------------------------------

@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_renders_on_a_filled_store(small_store: Path, page: str) -> None:
    at = render(small_store, page)
    no_exception(at)
    assert [t.value for t in at.title] == [page]
    assert not at.error and not at.warning
    assert "Read from the store at" in texts(at) and "refreshing every 5 s" in texts(at)


def test_fleet_shows_latest_predictions_most_urgent_first(small_store: Path) -> None:
    at = render(small_store)
    no_exception(at)
    table = frame(at, "urgency", "local", "federated")
    assert list(zip(table["site"], table["engine"], table["urgency"])) == [
        ("s2", "e1", "critical"), ("s1", "e4", "critical"), ("s1", "e3", "warning"), ("s2", "e2", "ok"),
        ("s1", "e1", "failed"), ("s1", "e2", "failed")]
    with SqliteStore(small_store) as store:
        latest = {(r["site"], r["engine"]): r for r in store.latest_predictions()}
    for row in table.to_dict("records"):
        want = latest[(row["site"], row["engine"])]
        assert row["cycle"] == want["cycle"]
        for key in ("local", "federated", "true_rul"):
            assert same(row[key], want[key]), (row, want)
    assert list(table["outside_range"]) == ["", "", "yes", "no", "", ""]  # s1/e3 flagged; s2/e2 checked, inside; the rest unknown
    assert (metric(at, "Critical"), metric(at, "Warning"), metric(at, "Failed (ran to failure)"),
            metric(at, "Engines in service"), metric(at, "Sites online")) == ("2", "1", "2", "4", "1 / 2")

    sites = frame(at, "status", "training_samples")
    assert list(sites["site"]) == ["s1", "s2"] and list(sites["status"]) == ["online", "offline"]
    assert list(sites["training_samples"]) == [1200, 800] and list(sites["model_version"]) == [3, 2]
    assert list(sites["engines"]) == [4, 2] and list(sites["critical"]) == [1, 1]
    assert pd.Timestamp(sites["last_seen"][0]).timestamp() == T0 + 100


def test_fleet_thresholds_and_basis_are_configurable(small_store: Path) -> None:
    at = render(small_store)
    at.slider(key="fleet_thresholds").set_value((0, 10)).run()
    no_exception(at)
    assert (metric(at, "Critical"), metric(at, "Warning")) == ("0", "1")  # only s2/e1 (RUL 1) is <= 10
    at.slider(key="fleet_thresholds").set_value((10, 50)).run()
    at.radio(key="fleet_basis").set_value("federated model").run()
    table = frame(at, "urgency", "rul")
    # Judged on the federated model: s2/e1 has 7 (critical), s1/e4 has no federated RUL (unknown).
    assert dict(zip(table["engine"] + "@" + table["site"], table["urgency"]))["e4@s1"] == "unknown"
    assert table["urgency"][0] == "critical" and table["rul"][0] == 7.0


def test_federated_page_shows_the_stores_metrics(small_store: Path) -> None:
    at = render(small_store, "Federated vs local")
    no_exception(at)
    with SqliteStore(small_store) as store:
        latest = store.latest_metrics()
    final = frame(at, "local_rmse", "federated_rmse")
    for m in latest:
        row = final[final["site"] == m["site"]].iloc[0]
        assert row[f"{m['model']}_rmse"] == m["rmse"] and row[f"{m['model']}_score"] == m["score"]
    assert list(final["rmse_gain"]) == [20.0 - 15.5, 18.0 - 19.0]
    fleet_fed = math.sqrt((4 * 15.5 ** 2 + 2 * 19.0 ** 2) / 6)
    assert metric(at, "Fleet RMSE, federated") == f"{fleet_fed:.2f}"
    assert metric(at, "Fleet RMSE, local") == f"{math.sqrt((4 * 20.0 ** 2 + 2 * 18.0 ** 2) / 6):.2f}"
    assert metric(at, "Sites where federation is better") == "1 / 2"
    assert metric(at, "Fleet PHM08 score, federated") == "280.0"

    per_round = frame(at, "round", "model", "rmse")
    s1_r1 = per_round[(per_round["site"] == "s1") & (per_round["round"] == 1)]
    assert dict(zip(s1_r1["model"], s1_r1["rmse"])) == {"local": 28.0, "federated": 22.0}  # last report of round 1

    # The trajectory starts on an engine with known truth: s1/e1 (local 12 - c, federated = truth 10 - c).
    assert at.selectbox(key="traj_site").value == "s1" and at.selectbox(key="traj_engine_s1").value == "e1"
    assert "local **2.00**, federated **0.00**" in texts(at)
    at.selectbox(key="traj_site").set_value("s2").run()
    no_exception(at)
    assert at.selectbox(key="traj_engine_s2").value == "e1"


def test_federated_page_other_views(small_store: Path) -> None:
    at = render(small_store, "Federated vs local")
    at.radio(key="fed_metric").set_value("PHM08 score").run()
    at.radio(key="fed_x").set_value("time").run()
    at.checkbox(key="fed_cap").check().run()
    no_exception(at)
    assert at.subheader[1].value == "PHM08 score per site, over time"
    assert not [w for w in at.warning if "training range" in w.value]
    at.selectbox(key="traj_site").set_value("s1").run()
    at.selectbox(key="traj_engine_s1").set_value("e3").run()  # flagged at its latest cycle (dashboard/samples.py)
    assert [w.value for w in at.warning if "training range" in w.value] == [
        "1 of 3 cycles including the latest (first: cycle 3) had readings outside a model's training range: "
        "the predictions there are extrapolations, to be trusted less."]


def test_rounds_page_shows_the_stores_rounds(small_store: Path) -> None:
    at = render(small_store, "Rounds")
    no_exception(at)
    with SqliteStore(small_store) as store:
        rounds = store.rounds()
    table = frame(at, "round", "participants", "samples")  # newest first
    assert list(table["round"]) == [r["round"] for r in reversed(rounds)] == [3, 2, 1, 0]
    assert list(table["samples"]) == [r["samples"] for r in reversed(rounds)] == [1200, 600, 600, 300]
    assert list(table["participants"]) == ["s1, s2", "s1", "s1, s2", "s1, s2"]
    assert list(table["aggregate_ms"]) == [15.5, 14.5, 13.5, 12.5]
    assert list(table["rejected"]) == [0, 1, 0, 0] and list(table["duration_s"]) == [8.0] * 4
    assert (metric(at, "Rounds closed"), metric(at, "Latest global model"), metric(at, "Sites in the latest round"),
            metric(at, "Rejected updates")) == ("4", "v3", "2", "2")
    rejected = frame(at, "reason", "detail")
    assert list(rejected["reason"]) == ["hash", "wrong_sender"]  # newest first
    assert rejected["detail"][0] == "sha256 mismatch"


def test_economics_page_matches_hand_computed_costs(small_store: Path) -> None:
    at = render(small_store, "Maintenance economics")
    no_exception(at)
    at.slider(key="econ_k").set_value(3)
    at.number_input(key="econ_interval").set_value(8)
    at.run()
    no_exception(at)
    table = frame(at, "policy", "cost")
    got = {r["policy"]: (r["engines"], r["maintenances"], r["failures"], r["open"], r["wasted_cycles"], r["cost"])
           for r in table.to_dict("records")}
    assert got == {
        "run to failure": (3, 0, 3, 0, 0.0, 3000.0),
        "fixed interval": (3, 2, 1, 0, 6.0, 1212.0),
        "local RUL ≤ k": (3, 2, 1, 0, 9.0, 1218.0),
        "federated RUL ≤ k": (3, 3, 0, 0, 9.0, 318.0),  # s2/e1 scheduled from its last prediction
        "federated lower bound ≤ k": (3, 0, 2, 1, 0.0, 2000.0),  # the sample store has no intervals
    }
    assert metric(at, "Federation saves vs local") == "900"
    assert metric(at, "Lowest total cost") == "318"
    assert [m.delta for m in at.metric if m.label == "Lowest total cost"] == ["federated RUL ≤ k"]
    at.number_input(key="econ_c_fail").set_value(500.0).run()
    assert frame(at, "policy", "cost").set_index("policy").loc["local RUL ≤ k", "cost"] == 200 + 500 + 18


def test_economics_can_keep_only_engines_run_to_failure(small_store: Path) -> None:
    at = render(small_store, "Maintenance economics")
    assert metric(at, "Engines") == "3"
    at.checkbox(key="econ_only_failed").check().run()
    no_exception(at)
    table = frame(at, "policy", "cost")
    assert set(table["engines"]) == {2} and set(table["open"]) == {0}
    assert metric(at, "Engines") == "2"


def test_auto_refresh_can_be_turned_off(small_store: Path) -> None:
    at = render(small_store, "Rounds")
    at.toggle(key=common.AUTO_KEY).set_value(False).run()
    no_exception(at)
    assert "auto-refresh off" in texts(at)


def test_failures_without_predictions_count_and_synthetic_data_is_named(small_store: Path) -> None:
    """Issue #17: a training engine that ran to failure before any model predicted it counts as
    failed; engines of the synthetic fleet are said to be synthetic (C-MAPSS ones are not)."""
    at = render(small_store)
    assert "Synthetic data" not in texts(at)
    with SqliteStore(small_store) as store:
        store.record_truth("s2", "SYN001-train-7", 190, 0.0, T0 + 200)  # failed, never predicted
        store.record_predictions("s2", [("SYN001-test-1", 3, 80.0, 75.0)], T0 + 201)
    at = render(small_store)
    no_exception(at)
    assert metric(at, "Failed (ran to failure)") == "3"  # s1/e1, s1/e2 and the never-predicted one
    assert "Synthetic data: 2 of 8 engines" in texts(at)


def test_failed_engines_and_synthetic_share() -> None:
    assert views.failed_engines([{"failed": True}, {"failed": False}, {"failed": True, "predictions": []}]) == 2
    assert views.synthetic_share(["SYN001-train-1", "syn-2", "FD001-test-1"]) == (2, 3)
    assert views.synthetic_share([]) == (0, 0)


# --- pure functions: views ----------------------------------------------------------------------

def test_urgency_boundaries() -> None:
    assert [views.urgency(v, 20, 50) for v in (0, 20, 20.5, 50, 50.1, None, float("nan"))] == [
        "critical", "critical", "warning", "warning", "ok", "unknown", "unknown"]
    assert views.basis_rul(30.0, 10.0, "either") == 10.0 and views.basis_rul(None, 10.0, "local") is None
    assert views.basis_rul(None, None, "either") is None and views.basis_rul(None, 4.0, "either") == 4.0


def test_fleet_table_and_counts() -> None:
    latest = [{"site": "s10", "engine": "e1", "cycle": 5, "local": 30.0, "federated": 60.0, "true_rul": None, "out_of_range": 0},
              {"site": "s2", "engine": "e10", "cycle": 7, "local": 10.0, "federated": 12.0, "true_rul": None, "out_of_range": 1},
              {"site": "s2", "engine": "e9", "cycle": 7, "local": 10.0, "federated": None, "true_rul": None},
              {"site": "s2", "engine": "e3", "cycle": 9, "local": None, "federated": None, "true_rul": None},
              {"site": "s1", "engine": "e1", "cycle": 9, "local": 3.0, "federated": 1.0, "true_rul": 0.0}]
    table = views.fleet_table(latest, critical=10, warning=40)
    assert list(table["engine"]) == ["e9", "e10", "e1", "e3", "e1"]  # ties: natural order e9 < e10
    assert list(table["urgency"]) == ["critical", "critical", "warning", "unknown", "failed"]
    assert table["gap"][1] == 2.0 and math.isnan(table["gap"][0])
    assert views.urgency_counts(table) == {"critical": 2, "warning": 1, "ok": 0, "unknown": 1, "failed": 1}
    assert list(table["outside_range"]) == ["", "yes", "no", "", ""]  # blank: the site did not say (stores give None)


def test_engine_page_notes_cycles_outside_the_training_range() -> None:
    trajectory = [{"cycle": c, "out_of_range": flag} for c, flag in ((1, None), (2, 0), (3, 1), (4, 1), (5, 0))]
    note = views.out_of_range_note(trajectory)
    assert note is not None and note.startswith("2 of 5 cycles (first: cycle 3) had readings outside")
    assert "including the latest" in views.out_of_range_note(trajectory[:4])
    assert views.out_of_range_note(trajectory[:2]) is None and views.out_of_range_note([]) is None
    assert views.urgency_counts(views.fleet_table([], 10, 40))["critical"] == 0


def test_site_table_includes_sites_without_status() -> None:
    fleet = views.fleet_table([{"site": "s3", "engine": "e1", "cycle": 1, "local": 5.0, "federated": 5.0,
                                "true_rul": None}], 10, 40)
    status = [{"site": "s1", "online": True, "at": 100.0, "last_seen": 100.0, "agent_version": "0.1.0",
               "model_version": 2, "samples": 10}]
    table = views.site_table(status, fleet, now=190.0)
    assert list(table["site"]) == ["s1", "s3"] and list(table["status"]) == ["online", "unknown"]
    assert list(table["seen"]) == ["1 min ago", "never"] and list(table["critical"]) == [0, 1]


def test_ago() -> None:
    assert [views.ago(s) for s in (0.4, 59, 60, 7200, 90000, None)] == [
        "0 s ago", "59 s ago", "1 min ago", "2 h ago", "1 d ago", "never"]


def test_round_metrics_keep_the_last_report_per_round() -> None:
    rows = [{"site": "s1", "round": 1, "model": "local", "rmse": 30.0, "score": 1.0, "engines": 2, "at": 1.0},
            {"site": "s1", "round": 1, "model": "local", "rmse": 28.0, "score": 2.0, "engines": 3, "at": 2.0},
            {"site": "s1", "round": None, "model": "local", "rmse": None, "score": None, "engines": 1, "at": 0.5}]
    table = views.round_metrics(rows)
    assert len(table) == 2 and table["rmse"].iloc[-1] == 28.0 and table["engines"].iloc[-1] == 3
    assert math.isnan(table["rmse"].iloc[0])  # round None sorts first, value unknown


def test_final_comparison_and_fleet_rmse() -> None:
    latest = [{"site": "a", "round": 2, "model": "local", "engines": 3, "rmse": 4.0, "score": 10.0},
              {"site": "a", "round": 2, "model": "federated", "engines": 3, "rmse": 2.0, "score": 5.0},
              {"site": "b", "round": 2, "model": "local", "engines": 1, "rmse": 8.0, "score": 1.0},
              {"site": "b", "round": 2, "model": "federated", "engines": 1, "rmse": None, "score": None}]
    final = views.final_comparison(latest)
    assert list(final["rmse_gain"][:1]) == [2.0] and math.isnan(final["rmse_gain"][1])
    fleet = views.fleet_rmse(final)
    assert fleet["local_rmse"] == pytest.approx(math.sqrt((3 * 16 + 64) / 4))
    assert fleet["federated_rmse"] == 2.0 and fleet["federated_score"] == 5.0 and fleet["local_score"] == 11.0


def test_trajectory_long_and_errors() -> None:
    traj = [{"cycle": 1, "local": 140.0, "federated": 120.0, "true_rul": 150.0},
            {"cycle": 2, "local": 100.0, "federated": None, "true_rul": 149.0},
            {"cycle": 3, "local": 90.0, "federated": 95.0, "true_rul": None}]
    long = views.trajectory_long(traj, cap=125)
    assert long[long["series"] == "true RUL"]["rul"].tolist() == [125, 125]
    assert len(long) == 2 + 3 + 2
    errors = views.trajectory_errors(traj, cap=125)
    assert errors["local"] == pytest.approx(math.sqrt((15 ** 2 + 25 ** 2) / 2)) and errors["federated"] == 5.0
    assert views.trajectory_errors(traj)["federated"] == 30.0
    assert views.default_engine([]) is None


def test_rounds_tables() -> None:
    rounds = [{"round": 0, "model_version": 0, "started": 10.0, "closed": 12.5, "aggregate_ms": 3.0,
               "strategy": "fedavg", "closed_by": "quorum", "samples": 30,
               "participants": [{"site": "s1", "samples": 10, "update_bytes": 100},
                                {"site": "s2", "samples": 20, "update_bytes": 200}]}]
    rejections = [{"round": 0, "site": "s3", "reason": "hash", "detail": "x", "at": 11.0},
                  {"round": None, "site": "s3", "reason": "hash", "detail": "y", "at": 12.0},
                  {"round": 0, "site": "s1", "reason": "stale_round", "detail": "z", "at": 13.0}]
    table = views.rounds_table(rounds, rejections)
    row = table.iloc[0]
    assert (row["duration_s"], row["sites"], row["update_bytes"], row["rejected"], row["participants"]) == (
        2.5, 2, 300, 2, "s1, s2")
    assert views.participants_table(rounds)["samples"].tolist() == [10, 20]
    # a two-level round: its summed sites carry no bytes, their region's summary does
    summed = {**rounds[0], "samples": 530, "regions": [{"region": "east", "sites": 2, "samples": 500, "update_bytes": 4000}],
              "participants": [*rounds[0]["participants"], {"site": "s3", "samples": 0, "update_bytes": 0}]}
    row = views.rounds_table([summed], [])
    assert (row.iloc[0]["sites"], row.iloc[0]["samples"], row.iloc[0]["update_bytes"]) == (3, 530, 4300)
    assert views.rejection_reasons(rejections).values.tolist() == [["hash", 2], ["stale_round", 1]]
    assert views.rejections_table(rejections)["detail"].tolist() == ["z", "y", "x"]


def test_page_reads_use_only_the_store_interface(small_store: Path) -> None:
    with SqliteStore(small_store) as store:
        for page, read in views.PAGE_READS.items():
            data = read(store)
            assert data and all(isinstance(v, list) for v in data.values()), page
        assert views.PAGE_READS["Federated vs local"](store)["trajectory"] == store.engine_trajectory("s1", "e1")


def test_charts_build_valid_specs(small_store: Path) -> None:
    with SqliteStore(small_store) as store:
        fleet = views.fleet_table(store.latest_predictions(), 20, 50)
        per_round = views.round_metrics(store.metrics())
        final = views.final_comparison(store.latest_metrics())
        traj = views.trajectory_long(store.engine_trajectory("s1", "e1"))
        rounds = views.rounds_table(store.rounds(), store.rejections())
        parts = views.participants_table(store.rounds())
        reasons = views.rejection_reasons(store.rejections())
        lives = economics.engine_lives(store.engines_with_truth())
    results = pd.DataFrame([r.as_row() for r in economics.compare_policies(lives, 3, 8, economics.Costs())])
    sweep = pd.DataFrame(economics.cost_sweep(lives, [0, 3, 10], economics.Costs()))
    built = [charts.fleet_scatter(fleet, 20, 50), charts.metric_lines(per_round, "rmse"),
             charts.metric_lines(views.metrics_over_time([]), "score", "at"), charts.final_bars(final),
             charts.trajectory_chart(traj, [20]), charts.samples_bars(parts), charts.round_timing(rounds),
             charts.reason_bars(reasons), charts.policy_cost_bars(results),
             charts.cost_sweep_chart(sweep, results.iloc[:2], 3)]
    for chart in built:
        assert "$schema" in chart.to_dict()


# --- pure functions: economics ---------------------------------------------------------------------

def life(end: float, failed: bool, cycles: list[int], local: list[float | None],
         federated: list[float | None]) -> economics.EngineLife:
    nan = lambda xs: np.array([np.nan if x is None else x for x in xs], dtype=float)  # noqa: E731
    return economics.EngineLife("s", "e", end, failed, np.array(cycles, dtype=float), nan(local), nan(federated))


def test_first_trigger() -> None:
    got = economics.first_trigger(np.array([1.0, 2, 3, 4]), np.array([5.0, np.nan, 2, 4]), [1, 2, 4.5, 5, 10])
    assert np.isnan(got[0]) and got[1:].tolist() == [3.0, 3.0, 1.0, 1.0]
    assert np.isnan(economics.first_trigger(np.array([]), np.array([]), [5])[0])


def test_single_engine_policies() -> None:
    e = life(10, True, list(range(1, 11)), [12.0 - c for c in range(1, 11)], [10.0 - c for c in range(1, 11)])
    assert economics.run_to_failure(e) == economics.Outcome("failed", 10)
    assert economics.fixed_interval(e, 8) == economics.Outcome("maintained", 8, 2)
    assert economics.fixed_interval(e, 10) == economics.Outcome("failed", 10)  # RUL 0: too late
    assert economics.threshold_policy(e, "local", 3) == economics.Outcome("maintained", 9, 1)
    assert economics.threshold_policy(e, "federated", 3) == economics.Outcome("maintained", 7, 3)
    assert economics.threshold_policy(e, "federated", 0) == economics.Outcome("failed", 10)  # triggers at F
    assert economics.threshold_policy(e, "local", 1) == economics.Outcome("failed", 10)  # never triggers
    with pytest.raises(ValueError):
        economics.fixed_interval(e, 0)
    # Data end at cycle 3 with 9 cycles left (F = 12): an untriggered model schedules from its last prediction.
    revealed = life(12, False, [1, 2, 3], [30.0, 30.0, 14.5], [9.0, 5.0, None])
    assert economics.threshold_policy(revealed, "federated", 5) == economics.Outcome("maintained", 2, 10)
    assert economics.threshold_policy(revealed, "local", 10) == economics.Outcome("maintained", 8, 4)  # 3 + ceil(4.5)
    assert economics.threshold_policy(revealed, "local", 3) == economics.Outcome("failed", 12)  # 3 + 12: too late
    assert economics.scheduled_cycle(revealed, "local", [14, 14.5, 20]).tolist() == [4.0, 4.0, 4.0]  # >= next cycle
    unseen = life(12, False, [1, 2], [None, None], [None, None])
    assert economics.threshold_policy(unseen, "local", 10) == economics.Outcome("open", None)


def hand_fleet() -> list[economics.EngineLife]:
    """The small sample store's engines with truth (see turbofed.dashboard.samples)."""
    return [life(10, True, list(range(1, 11)), [12.0 - c for c in range(1, 11)], [10.0 - c for c in range(1, 11)]),
            life(6, True, list(range(1, 7)), [20.0] * 6, [6.0 - c for c in range(1, 7)]),
            life(12, False, [1, 2, 3, 4, 5], [None, 9.0, 8.0, 2.0, 1.0], [12.0 - c for c in range(1, 6)])]


def test_compare_policies_hand_computed() -> None:
    results = economics.compare_policies(hand_fleet(), k=3, interval=8, costs=economics.Costs(100, 1000, 2))
    got = {r.policy: (r.maintenances, r.failures, r.open, r.wasted_cycles, r.cost) for r in results}
    assert got == {"run to failure": (0, 3, 0, 0.0, 3000.0), "fixed interval": (2, 1, 0, 6.0, 1212.0),
                   "local RUL ≤ k": (2, 1, 0, 9.0, 1218.0), "federated RUL ≤ k": (3, 0, 0, 9.0, 318.0),
                   # no intervals recorded: nothing triggers; the failed engines fail, the revealed one stays open
                   "federated lower bound ≤ k": (0, 2, 1, 0.0, 2000.0)}
    assert [r.policy for r in results] == list(economics.POLICIES)
    fed = results[3]
    assert fed.cost_per_engine == 106.0 and fed.as_row()["cost_per_engine"] == 106.0
    with_open = economics.summarize("x", [economics.Outcome("maintained", 3, 2), economics.Outcome("open", None)],
                                    economics.Costs(100, 1000, 2))
    assert (with_open.open, with_open.cost, with_open.cost_per_engine) == (1, 104.0, 104.0)
    cheap = economics.compare_policies(hand_fleet(), 3, 8, economics.Costs(maintenance=10, failure=500, wasted_cycle=1))
    assert cheap[2].cost == 2 * 10 + 500 + 9


def test_lower_bound_policy_acts_on_the_interval_and_prices_it(tmp_path: Path) -> None:
    """Maintain when the federated prediction's conformal lower bound drops to k: earlier than
    the point prediction (more wasted life), never later. By hand, k = 3, costs (100, 1000, 2):
    engine 1 (F = 10, federated 10 - c, lower bound 7 - c) is maintained at cycle 4 (6 cycles
    wasted) instead of 7 (3 wasted); engine 2 (F = 12, data end at cycle 3 with lower bound 9.5)
    is scheduled at 3 + ceil(9.5 - 3) = 10, 2 cycles early. Total 2 x 100 + 8 x 2 = 216."""
    store = SqliteStore(tmp_path / "r.sqlite")
    store.record_predictions("s", [("e1", c, None, 10.0 - c, max(0.0, 7.0 - c), 13.0 - c) for c in range(1, 11)], 1.0)
    store.record_predictions("s", [("e2", c, None, 20.0, lo, 30.0) for c, lo in ((1, 20.0), (2, 15.0), (3, 9.5))], 1.0)
    store.record_truth("s", "e1", 10, 0.0, 2.0)
    store.record_truth("s", "e2", 3, 9.0, 2.0)
    lives = economics.engine_lives(store.engines_with_truth())
    store.close()
    assert lives[0].predicted("lower").tolist() == [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert economics.threshold_policy(lives[0], "lower", 3) == economics.Outcome("maintained", 4, 6)
    assert economics.threshold_policy(lives[0], "federated", 3) == economics.Outcome("maintained", 7, 3)
    assert economics.threshold_policy(lives[1], "lower", 3) == economics.Outcome("maintained", 10, 2)
    result = {r.policy: r for r in economics.compare_policies(lives, 3, 8, economics.Costs(100, 1000, 2))}
    lower = result["federated lower bound ≤ k"]
    assert (lower.maintenances, lower.failures, lower.open, lower.wasted_cycles, lower.cost) == (2, 0, 0, 8.0, 216.0)
    sweep = economics.cost_sweep(lives, [3], economics.Costs(100, 1000, 2))
    assert next(r for r in sweep if r["model"] == "lower")["cost"] == 216.0


def test_fleet_ranks_by_the_lower_bound_and_the_band_follows_the_trajectory() -> None:
    latest = [{"site": "s1", "engine": "e1", "cycle": 5, "local": 30.0, "federated": 40.0, "lower": 25.0, "upper": 55.0},
              {"site": "s1", "engine": "e2", "cycle": 5, "local": 30.0, "federated": 35.0, "lower": 31.0, "upper": 40.0},
              {"site": "s1", "engine": "e3", "cycle": 5, "local": 30.0, "federated": 20.0}]
    table = views.fleet_table(latest, critical=10, warning=30, basis="lower")
    assert list(table["engine"]) == ["e1", "e2", "e3"]  # by lower bound; no interval: unknown, last
    assert list(table["urgency"]) == ["warning", "ok", "unknown"] and list(table["rul"][:2]) == [25.0, 31.0]
    assert list(views.fleet_table(latest, 10, 30, basis="federated")["engine"]) == ["e3", "e2", "e1"]
    traj = [{"cycle": 1, "federated": 50.0, "lower": 40.0, "upper": 60.0}, {"cycle": 2, "federated": 49.0}]
    band = views.trajectory_band(traj)
    assert band.to_dict("records") == [{"cycle": 1, "lower": 40.0, "upper": 60.0}]
    spec = charts.trajectory_chart(views.trajectory_long(traj), band=band).to_dict()
    assert any(layer.get("mark", {}).get("type") == "area" for layer in spec["layer"])


def test_engines_from_the_store_give_the_same_answer(small_store: Path) -> None:
    with SqliteStore(small_store) as store:
        rows = store.engines_with_truth()
    lives = economics.engine_lives(rows)
    assert [(e.site, e.engine, e.end_of_life, e.observed_to_failure) for e in lives] == [
        ("s1", "e1", 10.0, True), ("s1", "e2", 6.0, True), ("s2", "e1", 12.0, False)]
    from_store = economics.compare_policies(lives, 3, 8, economics.Costs())
    assert from_store == economics.compare_policies(hand_fleet(), 3, 8, economics.Costs())
    assert len(economics.engine_lives(rows, include_revealed=False)) == 2
    detail = economics.engine_detail(lives, 3, 8)
    assert detail[2]["federated RUL ≤ k"] == "maintained @ 9" and detail[0]["local RUL ≤ k"] == "maintained @ 9"


def test_cost_sweep_agrees_with_single_k() -> None:
    fleet, costs = hand_fleet(), economics.Costs(100, 1000, 2)
    fleet.append(life(30, False, [1, 2], [None, None], [None, 25.0]))  # local: open; federated: scheduled
    ks = [0, 1, 2, 3, 5, 7.5, 8, 10, 30]
    sweep = economics.cost_sweep(fleet, ks, costs)
    for k in ks:
        single = economics.compare_policies(fleet, k, 8, costs)
        for model, result in zip(economics.MODELS, single[2:]):
            row = next(r for r in sweep if r["model"] == model and r["k"] == k)
            assert (row["maintenances"], row["failures"], row["open"], row["wasted_cycles"], row["cost"]) == (
                result.maintenances, result.failures, result.open, result.wasted_cycles, result.cost), (model, k)
    best = economics.cheapest_k(sweep, "federated")
    assert best is not None and best["cost"] == min(r["cost"] for r in sweep if r["model"] == "federated")
    assert economics.cheapest_k([], "local") is None


# --- the launcher ------------------------------------------------------------------------------------

def test_launch_command_wraps_streamlit_run() -> None:
    cmd = launch.command("x/results.sqlite", 8600)
    assert cmd[:5] == [sys.executable, "-m", "streamlit", "run", str(APP)]
    assert "--server.headless=true" in cmd and "--server.address=127.0.0.1" in cmd and "--server.port=8600" in cmd
    assert cmd[-3:] == ["--", "--store", "x/results.sqlite"]
    assert common.store_path_from_args(cmd[cmd.index("--") + 1:]) == "x/results.sqlite"
    assert common.store_path_from_args(["-q", "tests"]) is None


def test_run_cli_returns_streamlits_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "command", lambda store, port, address="127.0.0.1": [
        sys.executable, "-c", f"import sys; sys.exit(3 if sys.argv[1:] == [] and {port} == 8777 else 1)"])
    assert launch.run_cli(argparse.Namespace(store="s.sqlite", port=8777)) == 3


def test_local_file() -> None:
    assert common.local_file("sqlite:///tmp/a.sqlite") == Path("/tmp/a.sqlite")
    assert common.local_file("influxdb://host:8086") is None and common.local_file("influxdb") is None
    assert common.local_file("influxdb+http://host:8086/?org=o&bucket=b") is None
    assert common.local_file("rel/a.sqlite") == Path("rel/a.sqlite")


def test_aggregator_conditions_show_open_faults_only() -> None:
    from turbofed.dashboard.views import aggregator_conditions

    def ev(kind: str, **detail: object) -> dict:
        return {"kind": kind, "detail": detail, "at": 0.0}

    newest_first = [ev("disk_full", what="registry folder /r", problem="disk full (No space left on device)"),
                    ev("stall_over", round=3), ev("stalled", reason="round 3 closed 3 times"), ev("disk_ok", round=2),
                    ev("disk_full", what="old", problem="old")]
    assert aggregator_conditions(newest_first) == ["disk full: registry folder /r: disk full (No space left on device)"]
    assert aggregator_conditions([ev("stalled", reason="round 7 closed 3 times")]) == ["stalled: round 7 closed 3 times"]
    assert aggregator_conditions([ev("fleet_reset"), ev("stalled", reason="old")]) == []


def test_rounds_page_shows_privacy_spent_and_budget(tmp_path: Path) -> None:
    """With [privacy]: the newest "privacy" event's epsilon, the budget and delta; a spent budget is said."""
    path = tmp_path / "dp.sqlite"
    with SqliteStore(path) as store:
        store.record_event("started", {"strategy": "fedavg"}, 1.0)
        for r, eps in ((1, 2.5), (2, 3.75)):
            store.record_event("privacy", {"round": r, "epsilon": eps, "delta": 1e-5, "epsilon_budget": 4.0}, 1.0 + r)
        store.record_event("privacy_budget_spent", {"epsilon": 3.75, "epsilon_budget": 4.0, "dp_rounds": 2}, 4.0)
    at = render(path, "Rounds")
    no_exception(at)
    assert (metric(at, "Privacy spent (ε)"), metric(at, "Privacy budget (ε)"), metric(at, "δ")) == ("3.75", "4.00", "1e-05")
    assert "Privacy budget spent" in texts(at)
