"""What each dashboard page reads from the results store, and the tables it shows.

The Streamlit scripts only lay things out; every number they show is computed here, by
pure functions of the store's read results (lists of dicts), so it can be unit-tested with
known values and benchmarked without a browser. Reads go through the `ResultsStore`
interface only: the InfluxDB store will plug in unchanged.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import pandas as pd

from turbofed.store import ResultsStore
from turbofed.store.interface import round_total
from turbofed.topics import natural_key

Basis = Literal["either", "local", "federated", "lower"]
URGENCY_LEVELS = ("critical", "warning", "ok", "unknown", "failed")
URGENCY_COLORS = {"critical": "#d62728", "warning": "#ff9f1c", "ok": "#2ca02c",
                  "unknown": "#b0b0b0", "failed": "#6b6b6b"}
MODEL_COLORS = {"local": "#1f77b4", "federated": "#e45756", "true RUL": "#333333", "lower": "#f58518"}
EVENTS_SHOWN = 50
BASIS_LABELS: dict[str, Basis] = {"the lower of the two": "either", "federated model": "federated",
                                  "local model": "local", "federated lower bound": "lower"}


def _num(value: Any) -> float:
    """None -> NaN, so DataFrames hold floats and missing values stay visible as blanks."""
    return float("nan") if value is None else float(value)


def _timestamp(at: float | None) -> pd.Timestamp | None:
    """Unix seconds -> a UTC timestamp Streamlit renders as a date."""
    return None if at is None else pd.Timestamp(at, unit="s", tz="UTC")


def ago(seconds: float | None) -> str:
    """"12 s ago": how stale a site's last message is, at a glance."""
    if seconds is None or math.isnan(seconds):
        return "never"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


# --- fleet -----------------------------------------------------------------------------

def basis_rul(local: float | None, federated: float | None, basis: Basis, lower: float | None = None) -> float | None:
    """The RUL urgency is judged on: one model's, the lower of the two (the cautious choice),
    or the lower end of the federated prediction's conformal interval (None without one)."""
    if basis == "lower":
        return lower
    if basis == "local":
        return local
    if basis == "federated":
        return federated
    known = [v for v in (local, federated) if v is not None]
    return min(known) if known else None


def urgency(rul: float | None, critical: float, warning: float) -> str:
    """critical (RUL <= critical), warning (<= warning), ok, or unknown (no prediction)."""
    if rul is None or math.isnan(rul):
        return "unknown"
    if rul <= critical:
        return "critical"
    return "warning" if rul <= warning else "ok"


def fleet_table(latest: Sequence[dict[str, Any]], critical: float, warning: float,
                basis: Basis = "either") -> pd.DataFrame:
    """Every engine's latest RUL from both models, most urgent first.

    An engine whose truth says RUL 0 at its latest cycle has failed (it ran to failure and
    left service): it is listed last, not as critical, because no decision is left to take.
    """
    rows = []
    for r in latest:
        rul = basis_rul(r.get("local"), r.get("federated"), basis, r.get("lower"))
        failed = r.get("true_rul") is not None and r["true_rul"] <= 0
        rows.append({"site": r["site"], "engine": r["engine"], "cycle": r["cycle"],
                     "urgency": "failed" if failed else urgency(rul, critical, warning),
                     "rul": _num(rul), "local": _num(r.get("local")), "federated": _num(r.get("federated")),
                     "lower": _num(r.get("lower")), "upper": _num(r.get("upper")), "true_rul": _num(r.get("true_rul")),
                     "outside_range": yes_no(r.get("out_of_range"))})
    rows.sort(key=lambda x: (URGENCY_LEVELS.index(x["urgency"]), math.inf if math.isnan(x["rul"]) else x["rul"],
                             natural_key(x["site"]), natural_key(x["engine"])))
    columns = ["site", "engine", "cycle", "urgency", "rul", "local", "federated", "lower", "upper", "true_rul", "outside_range"]
    table = pd.DataFrame(rows, columns=columns)
    table["gap"] = table["federated"] - table["local"]
    return table


def yes_no(flag: int | None) -> str:
    """A stored out_of_range flag for a table: "yes", "no", or "" where the site did not say."""
    return "" if flag is None else ("yes" if flag else "no")


def out_of_range_note(trajectory: Sequence[dict[str, Any]]) -> str | None:
    """A sentence for the engine page when any cycle's readings lay outside a model's training
    range (FeatureSpec.out_of_range, issue #15): those predictions are extrapolations."""
    flagged = [p["cycle"] for p in trajectory if p.get("out_of_range")]
    if not flagged:
        return None
    latest = " including the latest" if trajectory[-1].get("out_of_range") else ""
    return (f"{len(flagged)} of {len(trajectory)} cycles{latest} (first: cycle {flagged[0]}) had readings outside a "
            "model's training range: the predictions there are extrapolations, to be trusted less.")


def failed_engines(engines_with_truth: Sequence[dict[str, Any]]) -> int:
    """Engines whose failure reached the store (truth RUL 0), predicted or not: a training
    engine that ran to failure before any model existed has no prediction, but it failed."""
    return sum(1 for e in engines_with_truth if e.get("failed"))


SYNTHETIC_PREFIX = "SYN"  # `turbofed replay` names synthetic engines SYN001-train-1, ... (turbofed.simulation.fleet)


def synthetic_share(engines: Iterable[str]) -> tuple[int, int]:
    """(synthetic engines, engines): how much of what the store shows is the synthetic fleet."""
    names = list(engines)
    return sum(1 for e in names if str(e).upper().startswith(SYNTHETIC_PREFIX)), len(names)


def urgency_counts(table: pd.DataFrame) -> dict[str, int]:
    """Engines per urgency level (every level present, zeros included)."""
    counts = Counter(table["urgency"]) if len(table) else Counter()
    return {level: int(counts.get(level, 0)) for level in URGENCY_LEVELS}


def site_table(status: Sequence[dict[str, Any]], fleet: pd.DataFrame, now: float | None = None) -> pd.DataFrame:
    """One row per site: online, last seen, versions, training samples, and its engines' urgency.

    Sites that sent predictions but no status yet are listed too (status unknown).
    """
    now = time.time() if now is None else now
    by_site = {s["site"]: s for s in status}
    sites = sorted(set(by_site) | set(fleet["site"]), key=natural_key)
    rows = []
    for site in sites:
        s = by_site.get(site, {})
        mine = fleet[fleet["site"] == site]
        last_seen = s.get("last_seen")
        rows.append({
            "site": site,
            "status": ("online" if s["online"] else "offline") if s else "unknown",
            "last_seen": _timestamp(last_seen),
            "seen": ago(None if last_seen is None else now - last_seen),
            "agent_version": s.get("agent_version"),
            "model_version": s.get("model_version"),
            "training_samples": s.get("samples"),
            "engines": int(len(mine)),
            "critical": int((mine["urgency"] == "critical").sum()),
            "warning": int((mine["urgency"] == "warning").sum()),
        })
    return pd.DataFrame(rows, columns=["site", "status", "last_seen", "seen", "agent_version", "model_version",
                                       "training_samples", "engines", "critical", "warning"])


# --- federated vs local --------------------------------------------------------------------

def round_metrics(metrics: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """RMSE and PHM08 score per site, round and model: the last report of each round.

    Sites report metrics whenever a newly revealed truth changes them; within a round the
    latest report is the one that covers the most engines.
    """
    columns = ["site", "round", "model", "rmse", "score", "engines", "at"]
    latest: dict[tuple[Any, Any, str], dict[str, Any]] = {}
    for m in metrics:  # oldest first: later reports overwrite
        latest[(m["site"], m["round"], m["model"])] = m
    rows = [{"site": m["site"], "round": m["round"], "model": m["model"], "rmse": _num(m["rmse"]),
             "score": _num(m["score"]), "engines": m["engines"], "at": _timestamp(m["at"])}
            for m in latest.values()]
    rows.sort(key=lambda r: (natural_key(r["site"]), -math.inf if r["round"] is None else r["round"],
                             0 if r["model"] == "local" else 1))
    return pd.DataFrame(rows, columns=columns)


def validation_curve(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The learning curve: per site, round and model, the RMSE on the site's validation
    engines (held out of training) as that round's global model arrived. RMSE only: the
    PHM08 score is defined at a test engine's last cycle."""
    table = [{"site": r["site"], "round": r["round"], "model": r["model"], "rmse": _num(r["rmse"]), "score": math.nan,
              "engines": r["engines"], "at": _timestamp(r["at"])} for r in rows]
    table.sort(key=lambda r: (natural_key(r["site"]), r["round"], 0 if r["model"] == "local" else 1))
    return pd.DataFrame(table, columns=["site", "round", "model", "rmse", "score", "engines", "at"])


def metrics_over_time(metrics: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Every metrics report as it came in (x = time), for watching a live run converge."""
    rows = [{"site": m["site"], "round": m["round"], "model": m["model"], "rmse": _num(m["rmse"]),
             "score": _num(m["score"]), "engines": m["engines"], "at": _timestamp(m["at"])} for m in metrics]
    return pd.DataFrame(rows, columns=["site", "round", "model", "rmse", "score", "engines", "at"])


def final_comparison(latest_metrics: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per site, the latest local and federated RMSE and score side by side.

    `rmse_gain` = local - federated: positive means federation predicts better there.
    """
    by_site: dict[str, dict[str, Any]] = {}
    for m in latest_metrics:
        row = by_site.setdefault(m["site"], {"site": m["site"], "round": m["round"], "engines": m["engines"]})
        row[f"{m['model']}_rmse"] = _num(m["rmse"])
        row[f"{m['model']}_score"] = _num(m["score"])
        if m["round"] is not None and (row["round"] is None or m["round"] > row["round"]):
            row["round"], row["engines"] = m["round"], m["engines"]
    columns = ["site", "round", "engines", "local_rmse", "federated_rmse", "rmse_gain", "local_score", "federated_score"]
    table = pd.DataFrame([by_site[s] for s in sorted(by_site, key=natural_key)], columns=columns)
    table["rmse_gain"] = table["local_rmse"] - table["federated_rmse"]
    return table


def fleet_rmse(final: pd.DataFrame) -> dict[str, float]:
    """Fleet-wide RMSE per model, pooling sites by their scored engines (exact when every
    scored engine has both predictions), and the fleet's summed PHM08 score."""
    out: dict[str, float] = {}
    for model in ("local", "federated"):
        ok = final[f"{model}_rmse"].notna() & final["engines"].notna() & (final["engines"] > 0)
        n = final.loc[ok, "engines"].astype(float)
        sq = final.loc[ok, f"{model}_rmse"] ** 2
        out[f"{model}_rmse"] = float(math.sqrt((n * sq).sum() / n.sum())) if n.sum() > 0 else float("nan")
        scores = final[f"{model}_score"].dropna()
        out[f"{model}_score"] = float(scores.sum()) if len(scores) else float("nan")
    return out


def engine_options(latest: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Engines per site (natural order), for the trajectory picker."""
    out: dict[str, list[str]] = {}
    for r in latest:
        out.setdefault(r["site"], []).append(r["engine"])
    return {s: sorted(e, key=natural_key) for s, e in sorted(out.items(), key=lambda kv: natural_key(kv[0]))}


def default_engine(latest: Sequence[dict[str, Any]]) -> tuple[str, str] | None:
    """The engine the trajectory shows first: one whose truth is known (so both models can
    be judged against it), the one closest to its end of life; otherwise the first engine."""
    if not latest:
        return None
    known = [r for r in latest if r.get("true_rul") is not None]
    if known:
        r = min(known, key=lambda r: (r["true_rul"], natural_key(r["site"]), natural_key(r["engine"])))
        return r["site"], r["engine"]
    return latest[0]["site"], latest[0]["engine"]


def trajectory_long(trajectory: Sequence[dict[str, Any]], cap: float | None = None) -> pd.DataFrame:
    """One engine's RUL over cycles as long rows (cycle, series, rul) for a line chart.

    `cap` caps the truth the way the models were trained (piecewise-linear RUL): without
    it, early-life truth climbs far above anything a capped model predicts.
    """
    rows = []
    for p in trajectory:
        truth = p.get("true_rul")
        if truth is not None:
            rows.append({"cycle": p["cycle"], "series": "true RUL", "rul": min(truth, cap) if cap else truth})
        for model in ("local", "federated"):
            if p.get(model) is not None:
                rows.append({"cycle": p["cycle"], "series": model, "rul": float(p[model])})
    return pd.DataFrame(rows, columns=["cycle", "series", "rul"])


def trajectory_band(trajectory: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The federated prediction's conformal interval per cycle (cycles without one left out)."""
    rows = [{"cycle": p["cycle"], "lower": float(p["lower"]), "upper": float(p["upper"])} for p in trajectory
            if p.get("lower") is not None and p.get("upper") is not None]
    return pd.DataFrame(rows, columns=["cycle", "lower", "upper"])


def trajectory_errors(trajectory: Sequence[dict[str, Any]], cap: float | None = None) -> dict[str, float]:
    """RMSE of each model over the engine's cycles with known truth (NaN when none)."""
    out = {}
    for model in ("local", "federated"):
        d = [p[model] - (min(p["true_rul"], cap) if cap else p["true_rul"]) for p in trajectory
             if p.get(model) is not None and p.get("true_rul") is not None]
        out[model] = math.sqrt(sum(x * x for x in d) / len(d)) if d else float("nan")
    return out


# --- rounds ----------------------------------------------------------------------------------

def rounds_table(rounds: Sequence[dict[str, Any]], rejections: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per closed round, newest first: who took part, how much they sent, how long it took."""
    rejected = Counter(r["round"] for r in rejections if r["round"] is not None)
    rows = [{"round": r["round"], "model_version": r["model_version"], "strategy": r["strategy"],
             "closed_by": r["closed_by"], "started": _timestamp(r["started"]),
             "duration_s": r["closed"] - r["started"], "aggregate_ms": r["aggregate_ms"],
             "sites": len(r["participants"]), "participants": ", ".join(p["site"] for p in r["participants"]),
             "samples": r["samples"], "update_bytes": round_total(r, "update_bytes"),
             "rejected": rejected.get(r["round"], 0)} for r in reversed(rounds)]
    return pd.DataFrame(rows, columns=["round", "model_version", "strategy", "closed_by", "started", "duration_s",
                                       "aggregate_ms", "sites", "participants", "samples", "update_bytes", "rejected"])


def participants_table(rounds: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """(round, site, samples, update_bytes): each site's contribution to each round."""
    rows = [{"round": r["round"], **p} for r in rounds for p in r["participants"]]
    return pd.DataFrame(rows, columns=["round", "site", "samples", "update_bytes"])


def rejections_table(rejections: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Refused updates and messages, newest first: what an operator investigates."""
    rows = [{"at": _timestamp(r["at"]), "round": r["round"], "site": r["site"], "reason": r["reason"],
             "detail": r["detail"]} for r in reversed(rejections)]
    return pd.DataFrame(rows, columns=["at", "round", "site", "reason", "detail"])


def rejection_reasons(rejections: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """How often each reason occurred, commonest first."""
    counts = Counter(r["reason"] for r in rejections)
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return pd.DataFrame(rows, columns=["reason", "count"])


def events_table(events: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The aggregator's recent events (newest first), detail as compact JSON."""
    rows = [{"at": _timestamp(e["at"]), "kind": e["kind"], "detail": json.dumps(e["detail"], sort_keys=True)}
            for e in events]
    return pd.DataFrame(rows, columns=["at", "kind", "detail"])


# What each open condition's event is closed by (aggregator/service.py records both).
CONDITIONS = {"stalled": "stall_over", "disk_full": "disk_ok"}


def aggregator_conditions(events: Sequence[dict[str, Any]]) -> list[str]:
    """The aggregator's open faults, newest first, one line each: a "stalled" or "disk_full"
    event not followed by its "stall_over" / "disk_ok" (nor by a restart or reset of the aggregator)."""
    closed: set[str] = set()
    lines = []
    for e in events:  # newest first
        kind, detail = e["kind"], e["detail"] if isinstance(e["detail"], dict) else {}
        if kind in CONDITIONS.values():
            closed.add(kind)
        elif kind in CONDITIONS and CONDITIONS[kind] not in closed:
            closed.add(CONDITIONS[kind])  # only the newest of its kind counts
            what = detail.get("reason") if kind == "stalled" else f"{detail.get('what')}: {detail.get('problem')}"
            lines.append(f"{kind.replace('_', ' ')}: {what}")
        elif kind in ("fleet_reset", "started", "resumed"):
            break  # what came before was the previous run's
    return lines


def privacy_status(events: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The newest "privacy" event of this run (epsilon so far, delta, budget), with `spent`
    True if the aggregator has since said "privacy_budget_spent"; None without DP."""
    spent = False
    for e in events:  # newest first
        detail = e["detail"] if isinstance(e["detail"], dict) else {}
        if e["kind"] == "privacy_budget_spent":
            spent = True
        elif e["kind"] == "privacy":
            return {**detail, "spent": spent}
        elif e["kind"] in ("fleet_reset", "started"):
            return None
    return None


# --- the store reads each page makes --------------------------------------------------------

def read_fleet(store: ResultsStore) -> dict[str, Any]:
    return {"latest_predictions": store.latest_predictions(), "site_status": store.site_status(),
            "engines_with_truth": store.engines_with_truth()}


def read_federated(store: ResultsStore) -> dict[str, Any]:
    return {"metrics": store.metrics(), "latest_metrics": store.latest_metrics(),
            "latest_predictions": store.latest_predictions(), "validation": store.validation_metrics()}


def read_rounds(store: ResultsStore) -> dict[str, Any]:
    return {"rounds": store.rounds(), "rejections": store.rejections(), "events": store.events(EVENTS_SHOWN)}


def read_economics(store: ResultsStore) -> dict[str, Any]:
    return {"engines_with_truth": store.engines_with_truth()}


def _federated_first_load(store: ResultsStore) -> dict[str, Any]:
    data = read_federated(store)
    chosen = default_engine(data["latest_predictions"])
    data["trajectory"] = store.engine_trajectory(*chosen) if chosen else []
    return data


# Page title -> the store reads the page makes when it first loads (every page also calls
# counts() to tell an empty store from a filled one). The benchmark times exactly these.
PAGE_READS: dict[str, Callable[[ResultsStore], dict[str, Any]]] = {
    "Fleet": read_fleet,
    "Federated vs local": _federated_first_load,
    "Rounds": read_rounds,
    "Maintenance economics": read_economics,
}


def total_rows(counts: dict[str, int], tables: Iterable[str] | None = None) -> int:
    """Rows across the store's tables (or the named ones): zero means nothing to show."""
    return sum(v for k, v in counts.items() if tables is None or k in tables)
