"""The InfluxDB store's read side: the dashboard's queries, in Flux.

Kept apart from the write path (influx_write.py) so each reads on its own; the
`FluxReads` mixin expects `self.settings` (url, org, bucket) and `self._query_api()`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from turbofed.store.interface import ARCHIVE_EVENT, MODELS, StoreError, engine_flag, round_total
from turbofed.topics import natural_key


def http_status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    if status is None and getattr(exc, "response", None) is not None:
        status = getattr(exc.response, "status", None)
    return status if isinstance(status, int) else None

class FluxReads:
    """The ResultsStore read methods, answered by Flux queries."""

    def _query(self, name: str, flux: str) -> list[dict[str, Any]]:
        """Run one Flux query (its first line names it) and return its records' values."""
        text = f"// turbofed:{name}\n{flux}"
        try:
            tables = self._client.query_api().query(text, org=self.settings.org)
        except Exception as exc:  # noqa: BLE001 - any client or HTTP error means the same to a reader
            status = http_status(exc)
            detail = getattr(exc, "message", None) or str(exc)  # InfluxDB's JSON error message
            raise StoreError(f"InfluxDB query {name} failed{f' (HTTP {status})' if status else ''}: {detail}") from None
        return [record.values for table in tables for record in table.records]

    def _from(self) -> str:
        return f"from(bucket: {_flux_str(self.settings.bucket)}) |> range(start: {self.settings.read_start})"

    def rounds(self) -> list[dict[str, Any]]:
        """Rounds in order, each with its participants (by site), the totals of regions that
        sent summary partials, and total samples (both); a re-recorded round (resumed
        aggregator) is the latest record of it."""
        recs = self._query("rounds", f"""{self._from()}
  |> filter(fn: (r) => r._measurement == "rounds" or r._measurement == "round_participants" or r._measurement == "round_regions")
  {_PIVOT}""")
        latest: dict[int, dict[str, Any]] = {}
        parts: dict[tuple[int, datetime], list[dict[str, Any]]] = {}
        regions: dict[tuple[int, datetime], list[dict[str, Any]]] = {}
        # Rounds recorded before the newest fleet reset belong to an earlier epoch (archive_rounds).
        archived = [e["at"] for e in self.events(1000) if e["kind"] == ARCHIVE_EVENT and e["at"] is not None]
        since = max(archived, default=None)
        for r in recs:
            if r.get("round") is None or (since is not None and r["_time"].timestamp() <= since):
                continue
            if r["_measurement"] == "rounds":
                if r["round"] not in latest or r["_time"] >= latest[r["round"]]["_time"]:
                    latest[r["round"]] = r
            elif r["_measurement"] == "round_regions":
                regions.setdefault((r["round"], r["_time"]), []).append(
                    {"region": r["region"], "sites": r.get("sites"), "samples": r.get("samples"), "update_bytes": r.get("update_bytes")})
            else:
                part = {"site": r["site"], "samples": r.get("samples"), "update_bytes": r.get("update_bytes")}
                if r.get("action") is not None:
                    part.update(norm=r.get("norm"), cosine=r.get("cosine"), action=r["action"])
                parts.setdefault((r["round"], r["_time"]), []).append(part)
        out = []
        for number in sorted(latest):
            r = latest[number]
            record = {"round": number, "model_version": r.get("model_version"), "started": r.get("started"),
                      "closed": r.get("closed"), "aggregate_ms": r.get("aggregate_ms"), "strategy": r.get("strategy"),
                      "strategy_params": _json_object(r.get("strategy_params")), "closed_by": r.get("closed_by"),
                      "participants": sorted(parts.get((number, r["_time"]), []), key=lambda p: natural_key(p["site"])),
                      "regions": sorted(regions.get((number, r["_time"]), []), key=lambda g: natural_key(g["region"]))}
            out.append({**record, "samples": round_total(record, "samples")})
        return out

    def rejections(self, round: int | None = None) -> list[dict[str, Any]]:
        """Rejections in the order they happened (optionally of one round); `id` is the
        row's ordinal (InfluxDB has no row ids)."""
        recs = self._query("rejections", f"""{self._from()}
  |> filter(fn: (r) => r._measurement == "rejections")
  {_PIVOT}""")
        recs.sort(key=lambda r: (_at(r), r["_time"]))
        rows = [{"id": i, "round": r.get("round"), "site": r.get("site"), "reason": r.get("reason"),
                 "detail": r.get("detail"), "at": _at(r)} for i, r in enumerate(recs, 1)]
        return rows if round is None else [r for r in rows if r["round"] == round]

    def site_status(self) -> list[dict[str, Any]]:
        """Latest status per site; last_seen = the newest of its online statuses, metrics,
        predictions and sensor rows (as in SQLite: a site that reports is alive)."""
        recs = self._query("site_status", f"""data = {self._from()}
data
  |> filter(fn: (r) => r._measurement == "site_status")
  |> last()
  |> yield(name: "status")
data
  |> filter(fn: (r) => r._measurement == "site_status" and r._field == "online")
  |> filter(fn: (r) => r._value == true)
  |> last()
  |> yield(name: "online")
data
  |> filter(fn: (r) => (r._measurement == "metrics" and r._field == "at")
      or ((r._measurement == "predictions" or r._measurement == "sensors") and r._field == "cycle"))
  |> last()
  |> keep(columns: ["_time", "site"])
  |> group(columns: ["site"])
  |> sort(columns: ["_time"])
  |> last(column: "_time")
  |> yield(name: "seen")""")
        status: dict[str, dict[str, Any]] = {}
        seen: dict[str, float] = {}
        for r in recs:
            site = r.get("site")
            if site is None:
                continue
            if r.get("result") == "status":
                status.setdefault(site, {})[r["_field"]] = r["_value"]
            else:
                seen[site] = max(seen.get(site, -math.inf), r["_time"].timestamp())
        rows = []
        for site, s in status.items():
            if "online" not in s:
                continue
            last_seen = seen.get(site)
            rows.append({"site": site, "online": bool(s["online"]), "at": s.get("at"), "last_seen": last_seen,
                         "agent_version": s.get("agent_version"), "model_version": s.get("model_version"),
                         "samples": s.get("samples")})
        return sorted(rows, key=lambda r: natural_key(r["site"]))

    def metrics(self, site: str | None = None) -> list[dict[str, Any]]:
        """Every metrics row (one per site, report and model), oldest first."""
        where = f" and r.site == {_flux_str(site)}" if site is not None else ""
        recs = self._query("metrics", f"""{self._from()}
  |> filter(fn: (r) => r._measurement == "metrics"{where})
  {_PIVOT}""")
        recs.sort(key=lambda r: (_at(r), r["_time"]))
        return [_metrics_row(i, r) for i, r in enumerate(recs, 1)]

    def validation_metrics(self) -> list[dict[str, Any]]:
        recs = self._query("validation_metrics", f"""{self._from()}
  |> filter(fn: (r) => r._measurement == "validation")
  {_PIVOT}""")
        newest: dict[tuple[Any, Any, Any], dict[str, Any]] = {}  # a round's report sent again: the newest counts
        for r in sorted(recs, key=_at):
            if r.get("round") is not None:
                newest[(r.get("site"), r.get("round"), r.get("model"))] = {
                    "site": r.get("site"), "round": r.get("round"), "model": r.get("model"), "model_version": r.get("model_version"),
                    "engines": r.get("engines"), "rmse": r.get("rmse"), "at": _at(r)}
        return sorted(newest.values(), key=lambda r: (r["round"], natural_key(r["site"]), r["model"]))

    def latest_metrics(self) -> list[dict[str, Any]]:
        """The newest metrics row per (site, model)."""
        recs = self._query("latest_metrics", f"""{self._from()}
  |> filter(fn: (r) => r._measurement == "metrics")
  {_PIVOT}
  |> last(column: "at")""")
        newest: dict[tuple[str, str], dict[str, Any]] = {}
        for r in recs:
            key = (r.get("site"), r.get("model"))
            if key not in newest or (_at(r), r["_time"]) >= (_at(newest[key]), newest[key]["_time"]):
                newest[key] = r
        rows = [_metrics_row(i, r) for i, r in enumerate(newest.values(), 1) if r.get("model") in MODELS]
        return sorted(rows, key=lambda r: (natural_key(r["site"]), MODELS.index(r["model"])))

    def latest_predictions(self) -> list[dict[str, Any]]:
        """Per (site, engine): the latest predicted cycle, both models' RUL there, and the
        true RUL at that cycle where known."""
        recs = self._query("latest_predictions", f"""data = {self._from()}
data
  |> filter(fn: (r) => r._measurement == "predictions")
  {_PIVOT}
  |> max(column: "cycle")
  |> yield(name: "latest")
data
  {_LATEST_TRUTH}
  |> yield(name: "truth")""")
        truth = _truth([r for r in recs if r.get("result") == "truth"])
        latest: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        for r in recs:
            if r.get("result") == "latest" and r.get("cycle") is not None and r.get("model") in MODELS:
                latest.setdefault((r["site"], r["engine"]), {})[r["model"]] = r
        rows = []
        for (site, engine), models in latest.items():
            cycle = max(m["cycle"] for m in models.values())
            row = {"site": site, "engine": engine, "cycle": cycle}
            for model in MODELS:
                m = models.get(model)
                row[model] = m.get("rul") if m is not None and m["cycle"] == cycle else None
            fed = models.get("federated")
            row["lower"], row["upper"] = (fed.get("lower"), fed.get("upper")) if fed is not None and fed["cycle"] == cycle else (None, None)
            row["out_of_range"] = engine_flag([m.get("out_of_range") for m in models.values() if m["cycle"] == cycle])
            row["true_rul"] = _true_rul(truth.get((site, engine)), cycle)
            rows.append(row)
        return sorted(rows, key=lambda r: (natural_key(r["site"]), natural_key(r["engine"])))

    def engine_trajectory(self, site: str, engine: str) -> list[dict[str, Any]]:
        """Per cycle of one engine: local, federated and (where known) true RUL."""
        recs = self._query("engine_trajectory", f"""data = {self._from()}
  |> filter(fn: (r) => (r._measurement == "predictions" or r._measurement == "truth")
      and r.site == {_flux_str(site)} and r.engine == {_flux_str(str(engine))})
data
  |> filter(fn: (r) => r._measurement == "predictions")
  {_PIVOT}
  |> yield(name: "predictions")
data
  {_LATEST_TRUTH}
  |> yield(name: "truth")""")
        truth = _truth([r for r in recs if r.get("result") == "truth"]).get((site, str(engine)))
        return _trajectory([r for r in recs if r.get("result") == "predictions"], truth)

    def engines_with_truth(self) -> list[dict[str, Any]]:
        """Per engine whose truth is known: truth cycle and RUL (failed: RUL 0 there) and its
        predictions at every cycle (the input of maintenance-policy economics)."""
        truth = _truth(self._query("truth", f"""{self._from()}
  {_LATEST_TRUTH}"""))
        if not truth:
            return []
        sites = _flux_list(sorted({s for s, _ in truth}))
        engines = _flux_list(sorted({e for _, e in truth}))
        recs = self._query("truth_predictions", f"""{self._from()}
  |> filter(fn: (r) => r._measurement == "predictions" and contains(value: r.site, set: {sites})
      and contains(value: r.engine, set: {engines}))
  {_PIVOT}""")
        by_engine: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in recs:
            by_engine.setdefault((r.get("site"), r.get("engine")), []).append(r)
        out = []
        for (site, engine), t in truth.items():
            out.append({"site": site, "engine": engine, "truth_cycle": t["cycle"], "truth_rul": t["rul"],
                        "failed": t["rul"] == 0, "predictions": _trajectory(by_engine.get((site, engine), []), t)})
        return sorted(out, key=lambda e: (natural_key(e["site"]), natural_key(e["engine"])))

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest `limit` events, newest first, detail decoded."""
        recs = self._query("events", f"""{self._from()}
  |> filter(fn: (r) => r._measurement == "events")
  {_PIVOT}
  |> group()
  |> sort(columns: ["_time"], desc: true)
  |> limit(n: {int(limit)})""")
        recs.sort(key=lambda r: (_at(r), r["_time"]), reverse=True)
        rows = []
        for i, r in enumerate(recs[: int(limit)], 1):
            try:
                detail = json.loads(r.get("detail") or "{}")
            except ValueError:
                detail = {"raw": r.get("detail")}
            rows.append({"id": i, "kind": r.get("kind"), "detail": detail, "at": _at(r)})
        return rows

    def counts(self) -> dict[str, int]:
        """Per table of the SQLite store (and sensors): how many records. Rounds count once
        each; predictions and sensor rows count points (a row re-sent later counts twice)."""
        points = " or ".join(f'(r._measurement == "{m}" and r._field == "{f}")' for m, f in
                             (("rejections", "at"), ("metrics", "at"), ("predictions", "rul"),
                              ("events", "at"), ("sensors", "cycle"), ("validation", "at")))
        recs = self._query("counts", f"""data = {self._from()}
data
  |> filter(fn: (r) => {points})
  |> group(columns: ["_measurement"])
  |> count()
  |> yield(name: "points")
data
  |> filter(fn: (r) => (r._measurement == "site_status" or r._measurement == "truth") and r._field == "at")
  |> last()
  |> group(columns: ["_measurement"])
  |> count()
  |> yield(name: "series")""")
        counts = dict.fromkeys(("rounds", "round_participants", "rejections", "site_status", "metrics",
                                "predictions", "truth", "events", "sensors", "validation_metrics"), 0)
        for r in recs:
            table = "validation_metrics" if r.get("_measurement") == "validation" else r.get("_measurement")
            if table in counts and r.get("_value") is not None:
                counts[table] += int(r["_value"])
        rounds = self.rounds()
        counts["rounds"] = len(rounds)
        counts["round_participants"] = sum(len(r["participants"]) for r in rounds)
        return counts


_PIVOT = '|> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")'
# The newest truth report per engine (what every truth-aware read starts from).
_LATEST_TRUTH = f'''|> filter(fn: (r) => r._measurement == "truth")
  {_PIVOT}
  |> last(column: "at")'''


def _flux_str(text: str) -> str:
    """A Flux string literal (Flux interpolates ${...}, so $ is escaped too)."""
    escaped = (str(text).replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
               .replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t"))
    return f'"{escaped}"'


def _flux_list(items: list[str]) -> str:
    return "[" + ", ".join(_flux_str(i) for i in items) + "]"


def _at(r: Mapping[str, Any]) -> float:
    at = r.get("at")
    return float(at) if at is not None else r["_time"].timestamp()


def _metrics_row(i: int, r: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": i, "site": r.get("site"), "round": r.get("round"), "model_version": r.get("model_version"),
            "model": r.get("model"), "engines": r.get("engines"), "rmse": r.get("rmse"), "score": r.get("score"),
            "at": _at(r)}


def _truth(recs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(site, engine) -> its latest truth record (cycle, rul)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in recs:
        if r.get("cycle") is None or r.get("rul") is None:
            continue
        key = (r.get("site"), r.get("engine"))
        if key not in out or (_at(r), r["_time"]) >= (_at(out[key]), out[key]["_time"]):
            out[key] = r
    return out


def _true_rul(truth: Mapping[str, Any] | None, cycle: int) -> float | None:
    """True RUL at `cycle` from the one known point (uncapped, as in SQLite)."""
    if truth is None or cycle > truth["cycle"]:
        return None
    return float(truth["rul"]) + (truth["cycle"] - cycle)


def _trajectory(recs: list[dict[str, Any]], truth: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Prediction records of one engine -> one row per cycle; a cycle re-sent later wins."""
    cycles: dict[int, dict[str, tuple[datetime, float | None, float | None, float | None, int | None]]] = {}
    for r in recs:
        model, cycle = r.get("model"), r.get("cycle")
        if model not in MODELS or cycle is None:
            continue
        seen = cycles.setdefault(cycle, {})
        if model not in seen or r["_time"] >= seen[model][0]:
            seen[model] = (r["_time"], r.get("rul"), r.get("lower"), r.get("upper"), r.get("out_of_range"))
    none = (None, None, None, None, None)
    return [{"cycle": c, "local": cycles[c].get("local", none)[1], "federated": cycles[c].get("federated", none)[1],
             "lower": cycles[c].get("federated", none)[2], "upper": cycles[c].get("federated", none)[3],
             "out_of_range": engine_flag([m[4] for m in cycles[c].values()]), "true_rul": _true_rul(truth, c)}
            for c in sorted(cycles)]


# --- the write machinery ---------------------------------------------------------------------



def _json_object(text: Any) -> dict[str, Any]:
    """A JSON object field; {} where it is missing (rounds written before it existed) or not an object."""
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
