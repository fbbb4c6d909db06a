"""Federated vs local: does federation predict better, site by site and engine by engine?
Layout only: the tables come from `turbofed.dashboard.views`, the charts from `turbofed.dashboard.charts`."""

from __future__ import annotations

import math

import streamlit as st

from turbofed.dashboard import charts, common, views
from turbofed.metrics import RUL_CAP

st.title("Federated vs local")
st.caption("Each site keeps two models: a local one trained only on its own engines and a federated one "
           "(the latest global model, which its training helped build). Both are scored on engines whose true RUL is known.")

with st.sidebar:
    st.subheader("Federated vs local")
    metric_label = st.radio("Metric", ["RMSE", "PHM08 score"], key="fed_metric",
                            help="PHM08 score: late predictions cost more than early ones; lower is better.")
    x_label = st.radio("Over", ["rounds", "time"], key="fed_x", horizontal=True,
                       help="Rounds: the last report of each round. Time: every report as it came in.")
    cap = st.checkbox(f"Cap the true RUL at {RUL_CAP:.0f}", value=False, key="fed_cap",
                      help="The models learn RUL capped at 125 cycles (piecewise linear target).")
metric = "rmse" if metric_label == "RMSE" else "score"


def _fmt(value: float, digits: int = 2) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def body() -> None:
    ready = common.ready_store()
    if ready is None:
        return
    store, _ = ready
    data = views.read_federated(store)
    per_round = views.round_metrics(data["metrics"])
    curve = views.validation_curve(data["validation"])  # per round, on held-out engines (sites with holdout_share)
    final = views.final_comparison(data["latest_metrics"])
    latest = data["latest_predictions"]
    if per_round.empty and not latest:
        common.waiting("No metrics or predictions yet: sites score their models once true RULs are known.")
        return
    common.note_synthetic([r["engine"] for r in latest])

    st.subheader("Latest, per site")
    if final.empty:
        common.waiting("No metrics yet: a site scores its models once an engine's true RUL is known.")
    else:
        fleet = views.fleet_rmse(final)
        better = int((final["rmse_gain"] > 0).sum())
        c = st.columns(4)
        c[0].metric("Fleet RMSE, local", _fmt(fleet["local_rmse"]))
        delta = fleet["federated_rmse"] - fleet["local_rmse"]
        c[1].metric("Fleet RMSE, federated", _fmt(fleet["federated_rmse"]),
                    delta=None if math.isnan(delta) else f"{delta:+.2f} vs local", delta_color="inverse")
        c[2].metric("Sites where federation is better", f"{better} / {final['rmse_gain'].notna().sum()}")
        c[3].metric("Fleet PHM08 score, federated", _fmt(fleet["federated_score"], 1),
                    help=f"local: {_fmt(fleet['local_score'], 1)} (lower is better)")
        left, right = st.columns([3, 2])
        left.dataframe(final, hide_index=True, width="stretch", column_config={
            "local_rmse": common.number_column("local RMSE", "%.2f"),
            "federated_rmse": common.number_column("federated RMSE", "%.2f"),
            "rmse_gain": common.number_column("RMSE gain", "%+.2f", help="local − federated: positive means "
                                              "federation predicts better at this site"),
            "local_score": common.number_column("local score", "%.1f"),
            "federated_score": common.number_column("federated score", "%.1f"),
            "engines": st.column_config.NumberColumn("engines scored", format="%d"),
        })
        right.altair_chart(charts.final_bars(final, metric), width="stretch")

    if not curve.empty:
        st.subheader("RMSE per site, per round, on validation engines")
        st.caption("After each round: the new global model and the site's local model, on the site's labelled engines "
                   "held out of training (holdout_share), every cycle, true RUL capped at 125.")
        st.altair_chart(charts.metric_lines(curve, "rmse", "round"))
    st.subheader(f"{metric_label} per site, {'per round' if x_label == 'rounds' else 'over time'}"
                 + (", on test engines" if not curve.empty else ""))
    if per_round.empty:
        common.waiting("No metrics yet.")
    else:
        if x_label == "rounds":
            st.caption("Round −1: before the first global model.")
            st.altair_chart(charts.metric_lines(per_round, metric, "round"))
        else:
            st.altair_chart(charts.metric_lines(views.metrics_over_time(data["metrics"]), metric, "at"))
        with st.expander("Per-round table"):
            st.dataframe(per_round, hide_index=True, width="stretch", column_config={
                "rmse": common.number_column("RMSE", "%.2f"), "score": common.number_column("PHM08 score"),
                "at": common.datetime_column("reported")})

    st.subheader("One engine over its life")
    if not latest:
        common.waiting("No predictions yet.")
        return
    options = views.engine_options(latest)
    first_site, first_engine = views.default_engine(latest) or (next(iter(options)), "")
    c = st.columns([1, 1, 2])
    site = c[0].selectbox("Site", list(options), index=list(options).index(first_site), key="traj_site")
    engines = options[site]
    engine = c[1].selectbox("Engine", engines, key=f"traj_engine_{site}",
                            index=engines.index(first_engine) if site == first_site and first_engine in engines else 0)
    trajectory = store.engine_trajectory(site, engine)
    errors = views.trajectory_errors(trajectory, RUL_CAP if cap else None)
    c[2].markdown(f"RMSE over this engine's cycles with known truth: local **{_fmt(errors['local'])}**, "
                  f"federated **{_fmt(errors['federated'])}**")
    if not trajectory:
        common.waiting("No predictions for this engine yet.")
        return
    band = views.trajectory_band(trajectory)
    st.altair_chart(charts.trajectory_chart(views.trajectory_long(trajectory, RUL_CAP if cap else None), band=band),
                    width="stretch")
    if not band.empty:
        st.caption("Shaded: the federated prediction's conformal interval (lower and upper RUL at the fleet's "
                   "configured coverage, calibrated on engines the model never trained on).")
    note = views.out_of_range_note(trajectory)
    if note is not None:
        st.warning(note)
    if all(p["true_rul"] is None for p in trajectory):
        st.caption("The true RUL of this engine is not known yet (it becomes known when the engine fails, "
                   "or when a test engine's RUL is revealed).")


common.live(body, key="federated")
