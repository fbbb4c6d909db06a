"""Maintenance economics: what would each maintenance policy have cost on the engines whose
end of life is known? Layout only: the policy arithmetic is in `turbofed.dashboard.economics`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from turbofed.dashboard import charts, common, economics, views

st.title("Maintenance economics")
st.caption("Five policies replayed on engines whose true end of life is known: run to failure, a fixed "
           "interval, maintain when the local (or the federated) model's predicted RUL drops to k, and "
           "maintain when the lower bound of the federated prediction's conformal interval drops to k. "
           "Maintaining early wastes the life left; acting too late means a failure in service. Where an "
           "engine's data end before its end of life, the model's last prediction schedules the maintenance.")

with st.sidebar:
    st.subheader("Policies")
    k = st.slider("k: maintain when predicted RUL ≤ k", 0, 125, 30, key="econ_k")
    interval = st.number_input("Fixed interval (cycles)", min_value=1, value=150, step=10, key="econ_interval")
    only_failed = st.checkbox(
        "Only engines run to failure", value=False, key="econ_only_failed",
        help="Leave out engines whose true RUL was revealed at their last cycle (C-MAPSS test engines). For "
             "those, a model that has not triggered by then schedules maintenance from its last prediction.")
    st.subheader("Unit costs")
    defaults = economics.Costs()
    costs = economics.Costs(
        maintenance=st.number_input("Planned maintenance", min_value=0.0, value=defaults.maintenance, step=10.0,
                                    key="econ_c_maint"),
        failure=st.number_input("Failure in service", min_value=0.0, value=defaults.failure, step=100.0,
                                key="econ_c_fail"),
        wasted_cycle=st.number_input("Per wasted cycle of life", min_value=0.0, value=defaults.wasted_cycle,
                                     step=0.5, key="econ_c_waste"),
    )

SWEEP_KS = np.arange(0, 126, 5)


def body() -> None:
    ready = common.ready_store()
    if ready is None:
        return
    store, _ = ready
    rows = views.read_economics(store)["engines_with_truth"]
    every = economics.engine_lives(rows, include_revealed=True)
    lives = [e for e in every if e.observed_to_failure] if only_failed else every
    if not lives:
        common.waiting("No engine has run to failure yet." + (
            f" {len(every)} engine(s) have a revealed RUL: untick *Only engines run to failure* in the sidebar "
            "to use them." if every else " An engine's truth becomes known when it fails or when a test "
            "engine's RUL is revealed."))
        return

    results = pd.DataFrame([r.as_row() for r in economics.compare_policies(lives, k, interval, costs)])
    by_policy = results.set_index("policy")
    local_cost = by_policy.loc[economics.threshold_policy_name("local"), "cost"]
    fed_cost = by_policy.loc[economics.threshold_policy_name("federated"), "cost"]
    cheapest = results[results["cost"] == results["cost"].min()]
    c = st.columns(4)
    failed = sum(e.observed_to_failure for e in lives)
    c[0].metric("Engines", len(lives), help=f"{failed} run to failure, {len(lives) - failed} with a revealed RUL")
    c[1].metric("Lowest total cost", f"{cheapest['cost'].iloc[0]:,.0f}", delta=" / ".join(cheapest["policy"]),
                delta_color="off", delta_arrow="off", help="The cheapest policy (several when they tie)")
    c[2].metric("Federation saves vs local", f"{local_cost - fed_cost:,.0f}",
                help=f"at k = {k}: local {local_cost:,.0f}, federated {fed_cost:,.0f}")
    c[3].metric("Failures avoided by federation",
                int(by_policy.loc[economics.threshold_policy_name("local"), "failures"]
                    - by_policy.loc[economics.threshold_policy_name("federated"), "failures"]))

    st.dataframe(results, hide_index=True, width="stretch", column_config={
        "wasted_cycles": common.number_column("wasted life (cycles)", "%.0f",
                                              help="Cycles of life left at removal, summed"),
        "cost": common.number_column("total cost", "%.0f"),
        "cost_per_engine": common.number_column("cost per engine", help="over engines with a decided outcome"),
        "open": st.column_config.NumberColumn("open", help="Engines the model never predicted: outcome unknown, "
                                              "no cost"),
    })

    left, right = st.columns([2, 3])
    left.markdown("**Total cost per policy**")
    left.altair_chart(charts.policy_cost_bars(results), width="stretch")
    right.markdown("**Cost against k**")
    sweep = pd.DataFrame(economics.cost_sweep(lives, np.unique(np.append(SWEEP_KS, k)), costs))
    notes = []
    for model in economics.MODELS:
        cheapest = economics.cheapest_k(sweep.to_dict("records"), model)
        if cheapest:
            notes.append(f"{model}: cheapest at k = {cheapest['k']:.0f} ({cheapest['cost']:,.0f}, "
                         f"{cheapest['failures']} failures)")
    baselines = results[results["policy"].isin([economics.RUN_TO_FAILURE, economics.FIXED_INTERVAL])]
    right.altair_chart(charts.cost_sweep_chart(sweep, baselines, k), width="stretch")
    right.caption(" · ".join(notes) + ". Dashed lines: run to failure and the fixed interval.")

    with st.expander("Per engine"):
        ends = np.array([e.end_of_life for e in lives])
        st.caption(f"End of life: min {ends.min():.0f}, median {np.median(ends):.0f}, max {ends.max():.0f} cycles.")
        st.dataframe(pd.DataFrame(economics.engine_detail(lives, k, interval)), hide_index=True, width="stretch")


common.live(body, key="economics")
