"""Rounds: who took part in each federated round, with how much, how long aggregation took,
and which updates the aggregator refused and why. Layout only (tables from `views`)."""

from __future__ import annotations

import streamlit as st

from turbofed.dashboard import charts, common, views

st.title("Rounds")
st.caption("Each round the aggregator collects model updates (ONNX weights and sample counts) from the "
           "sites until quorum or deadline, validates them and merges the accepted ones.")


def body() -> None:
    ready = common.ready_store()
    if ready is None:
        return
    store, _ = ready
    data = views.read_rounds(store)
    for condition in views.aggregator_conditions(data["events"]):
        st.warning(f"Aggregator {condition}", icon=":material/warning:")
    privacy = views.privacy_status(data["events"])
    if privacy is not None:
        budget = privacy.get("epsilon_budget")
        c = st.columns(3)
        c[0].metric("Privacy spent (ε)", f"{privacy.get('epsilon', 0):.2f}",
                    help="client-level differential privacy so far, at the δ shown (docs/privacy.md)")
        c[1].metric("Privacy budget (ε)", "∞" if budget is None or budget == float("inf") else f"{budget:.2f}")
        c[2].metric("δ", f"{privacy.get('delta', 0):g}")
        if privacy["spent"]:
            st.info("Privacy budget spent: the fleet has stopped training.", icon=":material/lock:")
    rounds = views.rounds_table(data["rounds"], data["rejections"])
    rejections = views.rejections_table(data["rejections"])
    if rounds.empty and rejections.empty:
        common.waiting("No round has closed yet.")
    else:
        last = rounds.iloc[0] if len(rounds) else None  # newest first
        c = st.columns(4)
        c[0].metric("Rounds closed", len(rounds))
        c[1].metric("Latest global model", "–" if last is None else f"v{int(last['model_version'])}")
        c[2].metric("Sites in the latest round", "–" if last is None else int(last["sites"]))
        c[3].metric("Rejected updates", len(rejections))

        if len(rounds):
            st.dataframe(rounds, hide_index=True, width="stretch", column_config={
                "model_version": st.column_config.NumberColumn("global model", format="v%d"),
                "closed_by": st.column_config.TextColumn("closed by", help="quorum (every expected update in), deadline, "
                                                         "rollback, ..."),
                "started": common.datetime_column("started"),
                "duration_s": common.number_column("duration (s)", help="announcement to close"),
                "aggregate_ms": common.number_column("aggregate (ms)", help="last accepted update to the "
                                                     "global model published"),
                "update_bytes": st.column_config.NumberColumn("update bytes", format="%d"),
                "samples": st.column_config.NumberColumn("samples", format="%d"),
            })
            participants = views.participants_table(data["rounds"])
            left, right = st.columns(2)
            if len(participants):
                left.markdown("**Training samples per site**")
                left.altair_chart(charts.samples_bars(participants), width="stretch")
            right.markdown("**Time to aggregate**")
            right.altair_chart(charts.round_timing(rounds), width="stretch")
            with st.expander("Participants per round"):
                st.dataframe(participants, hide_index=True, width="stretch", column_config={
                    "update_bytes": st.column_config.NumberColumn("update bytes", format="%d"),
                    "samples": st.column_config.NumberColumn("samples", format="%d")})

        st.subheader("Rejected updates")
        if rejections.empty:
            st.success("No update or message has been rejected.", icon=":material/check_circle:")
        else:
            st.dataframe(rejections, hide_index=True, width="stretch",
                         column_config={"at": common.datetime_column("at")})
            st.altair_chart(charts.reason_bars(views.rejection_reasons(data["rejections"])), width="stretch")

    events = views.events_table(data["events"])
    if len(events):
        with st.expander(f"Aggregator events (latest {views.EVENTS_SHOWN})"):
            st.dataframe(events, hide_index=True, width="stretch",
                         column_config={"at": common.datetime_column("at")})


common.live(body, key="rounds")
