"""Fleet: every engine's latest RUL from the local and the federated model, most urgent
first, and every site's status. Layout only: the tables come from `turbofed.dashboard.views`."""

from __future__ import annotations

import streamlit as st

from turbofed.dashboard import charts, common, views

st.title("Fleet")
st.caption("Latest predicted remaining useful life (RUL, in cycles) of every engine, from each site's "
           "local model and from the federated model; engines needing attention first.")

with st.sidebar:
    st.subheader("Urgency")
    critical, warning = st.slider("Critical ≤ / warning ≤ (RUL cycles)", 0, 150, (20, 50), step=5,
                                  key="fleet_thresholds",
                                  help="An engine is critical when its RUL is at or below the first value, "
                                       "a warning at or below the second.")
    basis_label = st.radio("Judge urgency on", list(views.BASIS_LABELS), key="fleet_basis",
                           help="The lower of the two models is the cautious choice; the federated lower bound "
                                "(its conformal interval's lower end) ranks by the life an engine may have left.")
basis = views.BASIS_LABELS[basis_label]


def _urgency_style(value: str) -> str:
    color = views.URGENCY_COLORS.get(value)
    return f"background-color: {color}; color: white; font-weight: 600" if color else ""


def body() -> None:
    ready = common.ready_store()
    if ready is None:
        return
    store, _ = ready
    data = views.read_fleet(store)
    fleet = views.fleet_table(data["latest_predictions"], critical, warning, basis)
    sites = views.site_table(data["site_status"], fleet)
    if fleet.empty and sites.empty:
        common.waiting("No site has reported its status or predictions yet.")
        return

    known = {(e["site"], e["engine"]) for e in [*data["latest_predictions"], *data["engines_with_truth"]]}
    common.note_synthetic([engine for _, engine in known])
    n = views.urgency_counts(fleet)
    online = int((sites["status"] == "online").sum())
    c = st.columns(5)
    c[0].metric("Engines in service", len(fleet) - n["failed"])
    c[1].metric("Critical", n["critical"], help=f"RUL ≤ {critical} cycles")
    c[2].metric("Warning", n["warning"], help=f"{critical} < RUL ≤ {warning} cycles")
    c[3].metric("Failed (ran to failure)", views.failed_engines(data["engines_with_truth"]),
                help="Engines whose failure reached the results store, training engines included (they are not "
                     "in the table below when no model predicted them). A site holds the failures of engines that "
                     "fail before any aggregator has spoken and reports them once one has.")
    c[4].metric("Sites online", f"{online} / {len(sites)}")

    st.subheader("Engines, most urgent first")
    if fleet.empty:
        common.waiting("No predictions yet.")
    else:
        st.dataframe(
            fleet.style.map(_urgency_style, subset=["urgency"]),
            hide_index=True, width="stretch", height=min(600, 38 + 35 * len(fleet)),
            column_config={
                "rul": common.number_column("RUL judged", help=f"RUL urgency is judged on ({basis_label})"),
                "local": common.number_column("local RUL"),
                "federated": common.number_column("federated RUL"),
                "lower": common.number_column("lower bound", help="Lower end of the federated RUL's conformal "
                                              "interval (blank: no interval yet); judge urgency on it in the sidebar"),
                "upper": common.number_column("upper bound", help="Upper end of the federated RUL's conformal interval"),
                "true_rul": common.number_column("true RUL", "%.0f", help="Known once the engine failed or "
                                                 "its RUL was revealed"),
                "gap": common.number_column("federated − local", help="Positive: the federated model "
                                            "expects more life left than the local one"),
                "outside_range": st.column_config.TextColumn("outside training range", help="yes: at its latest cycle "
                                                             "the engine's readings lie outside a model's training range, so "
                                                             "that RUL is an extrapolation (blank: the site did not say)"),
            })
        st.altair_chart(charts.fleet_scatter(fleet, critical, warning), width="stretch")

    st.subheader("Sites")
    st.dataframe(sites, hide_index=True, width="stretch", height=38 + 35 * len(sites), column_config={  # every site, no scrolling
        "last_seen": common.datetime_column("last seen"),
        "seen": st.column_config.TextColumn("seen"),
        "agent_version": st.column_config.TextColumn("agent version"),
        "model_version": st.column_config.NumberColumn("global model", format="v%d", help="the global model version the site follows"),
        "training_samples": st.column_config.NumberColumn("training samples", format="%d", help="labelled cycles in its training buffer"),
        "engines": st.column_config.NumberColumn("engines", format="%d"),
        "critical": st.column_config.NumberColumn("critical", format="%d"),
        "warning": st.column_config.NumberColumn("warning", format="%d"),
    })


common.live(body, key="fleet")
