"""Altair charts for the dashboard: built from the tables in `views` and `economics`.

Kept out of the page scripts so a chart is one call there, and so the charts can be built
(and their specs checked) in tests without Streamlit.
"""

from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import pandas as pd

from turbofed.dashboard.views import MODEL_COLORS, URGENCY_COLORS, URGENCY_LEVELS
from turbofed.topics import natural_key

MODEL_SCALE = alt.Scale(domain=["local", "federated", "lower"],
                        range=[MODEL_COLORS["local"], MODEL_COLORS["federated"], MODEL_COLORS["lower"]])
SERIES_SCALE = alt.Scale(domain=["true RUL", "local", "federated"],
                         range=[MODEL_COLORS["true RUL"], MODEL_COLORS["local"], MODEL_COLORS["federated"]])
URGENCY_SCALE = alt.Scale(domain=list(URGENCY_LEVELS), range=[URGENCY_COLORS[u] for u in URGENCY_LEVELS])
METRIC_TITLES = {"rmse": "RMSE (cycles)", "score": "PHM08 score"}


def fleet_scatter(fleet: pd.DataFrame, critical: float, warning: float) -> alt.LayerChart:
    """Local vs federated latest RUL per engine, coloured by urgency: agreement lies on the
    diagonal; the threshold lines show which side of them each model puts an engine."""
    data = fleet[fleet["urgency"] != "failed"].dropna(subset=["local", "federated"])
    top = float(max(data[["local", "federated"]].max().max(), warning, 1.0)) if len(data) else max(warning, 1.0)
    points = alt.Chart(data).mark_circle(size=70, opacity=0.85).encode(
        x=alt.X("local:Q", title="local model RUL (cycles)", scale=alt.Scale(domain=[0, top])),
        y=alt.Y("federated:Q", title="federated model RUL (cycles)", scale=alt.Scale(domain=[0, top])),
        color=alt.Color("urgency:N", scale=URGENCY_SCALE, legend=alt.Legend(title="urgency")),
        tooltip=["site:N", "engine:N", "cycle:Q", "urgency:N", alt.Tooltip("local:Q", format=".1f"),
                 alt.Tooltip("federated:Q", format=".1f"), alt.Tooltip("true_rul:Q", format=".0f")],
    )
    diagonal = alt.Chart(pd.DataFrame({"v": [0.0, top]})).mark_line(color="#999", strokeDash=[4, 4]).encode(
        x="v:Q", y="v:Q")
    rules = pd.DataFrame({"rul": [critical, warning], "level": ["critical", "warning"]})
    vrules = alt.Chart(rules).mark_rule(strokeDash=[2, 2]).encode(
        x="rul:Q", color=alt.Color("level:N", scale=URGENCY_SCALE, legend=None))
    hrules = alt.Chart(rules).mark_rule(strokeDash=[2, 2]).encode(
        y="rul:Q", color=alt.Color("level:N", scale=URGENCY_SCALE, legend=None))
    return alt.layer(diagonal, vrules, hrules, points).properties(height=380).interactive()


def metric_lines(table: pd.DataFrame, metric: str, x: str = "round") -> alt.Chart:
    """RMSE (or score) per round (or over time), one panel per site, local vs federated."""
    data = table.dropna(subset=[metric] + ([x] if x == "round" else []))
    sites = sorted(data["site"].unique(), key=natural_key)
    x_enc = (alt.X("round:Q", title="round", axis=alt.Axis(tickMinStep=1, format="d")) if x == "round"
             else alt.X("at:T", title="time"))
    base = alt.Chart(data).mark_line(point=True).encode(
        x=x_enc,
        y=alt.Y(f"{metric}:Q", title=METRIC_TITLES[metric]),
        color=alt.Color("model:N", scale=MODEL_SCALE),
        tooltip=["site:N", "round:Q", "model:N", alt.Tooltip("rmse:Q", format=".2f"),
                 alt.Tooltip("score:Q", format=".1f"), "engines:Q"],
    ).properties(width=250, height=190)
    return base.facet(facet=alt.Facet("site:N", sort=sites, title=None), columns=min(3, max(1, len(sites)))) \
        .resolve_scale(x="shared", y="shared").interactive()


def final_bars(final: pd.DataFrame, metric: str = "rmse") -> alt.Chart:
    """Latest local and federated metric per site as grouped bars."""
    long = final.melt(id_vars=["site"], value_vars=[f"local_{metric}", f"federated_{metric}"],
                      var_name="model", value_name=metric).dropna(subset=[metric])
    long["model"] = long["model"].str.removesuffix(f"_{metric}")
    sites = sorted(final["site"], key=natural_key)
    return alt.Chart(long).mark_bar().encode(
        x=alt.X("site:N", sort=sites, title="site"),
        xOffset=alt.XOffset("model:N", sort=["local", "federated"]),
        y=alt.Y(f"{metric}:Q", title=METRIC_TITLES[metric]),
        color=alt.Color("model:N", scale=MODEL_SCALE),
        tooltip=["site:N", "model:N", alt.Tooltip(f"{metric}:Q", format=".2f")],
    ).properties(height=280)


def trajectory_chart(long: pd.DataFrame, thresholds: Sequence[float] = (), band: pd.DataFrame | None = None) -> alt.LayerChart:
    """One engine: true, local and federated RUL over cycles (plus maintenance thresholds),
    and the federated prediction's conformal interval as a band where `band` has one."""
    lines = alt.Chart(long).mark_line().encode(
        x=alt.X("cycle:Q", title="cycle"),
        y=alt.Y("rul:Q", title="RUL (cycles)"),
        color=alt.Color("series:N", scale=SERIES_SCALE, title=None),
        # The truth is drawn wide and pale so a model that matches it stays visible on top.
        strokeWidth=alt.condition(alt.datum.series == "true RUL", alt.value(5), alt.value(2)),
        opacity=alt.condition(alt.datum.series == "true RUL", alt.value(0.35), alt.value(1.0)),
        order=alt.Order("cycle:Q"),
        tooltip=["cycle:Q", "series:N", alt.Tooltip("rul:Q", format=".1f")],
    )
    layers: list[alt.Chart] = [lines]
    if band is not None and not band.empty:
        layers.insert(0, alt.Chart(band).mark_area(color=MODEL_COLORS["federated"], opacity=0.18).encode(
            x="cycle:Q", y=alt.Y("lower:Q", title="RUL (cycles)"), y2="upper:Q",
            tooltip=["cycle:Q", alt.Tooltip("lower:Q", format=".1f", title="lower bound"),
                     alt.Tooltip("upper:Q", format=".1f", title="upper bound")]))
    if thresholds:
        layers.append(alt.Chart(pd.DataFrame({"rul": list(thresholds)})).mark_rule(
            color="#999", strokeDash=[2, 2]).encode(y="rul:Q"))
    return alt.layer(*layers).properties(height=340).interactive()


def samples_bars(participants: pd.DataFrame) -> alt.Chart:
    """Training samples each site contributed, stacked per round."""
    return alt.Chart(participants).mark_bar().encode(
        x=alt.X("round:O", title="round"),
        y=alt.Y("samples:Q", title="training samples"),
        color=alt.Color("site:N", sort=sorted(participants["site"].unique(), key=natural_key)),
        tooltip=["round:Q", "site:N", "samples:Q", "update_bytes:Q"],
    ).properties(height=260)


def round_timing(rounds: pd.DataFrame) -> alt.Chart:
    """Aggregation time per round (ms): the server-side cost of federation."""
    return alt.Chart(rounds).mark_line(point=True).encode(
        x=alt.X("round:Q", axis=alt.Axis(tickMinStep=1, format="d")),
        y=alt.Y("aggregate_ms:Q", title="time to aggregate (ms)"),
        tooltip=["round:Q", "sites:Q", "closed_by:N", alt.Tooltip("aggregate_ms:Q", format=".1f"),
                 alt.Tooltip("duration_s:Q", format=".1f")],
    ).properties(height=260)


def reason_bars(reasons: pd.DataFrame) -> alt.Chart:
    """Rejected updates by reason."""
    return alt.Chart(reasons).mark_bar(color="#d62728", size=18).encode(
        x=alt.X("count:Q", title="rejections", axis=alt.Axis(tickMinStep=1, format="d")),
        y=alt.Y("reason:N", sort="-x", title=None),
        tooltip=["reason:N", "count:Q"]).properties(height=30 * len(reasons) + 20)


def policy_cost_bars(results: pd.DataFrame) -> alt.Chart:
    """Total cost per maintenance policy."""
    return alt.Chart(results).mark_bar().encode(
        x=alt.X("cost:Q", title="total cost"),
        y=alt.Y("policy:N", sort=list(results["policy"]), title=None),
        color=alt.Color("policy:N", legend=None, scale=alt.Scale(
            domain=list(results["policy"]),
            range=["#6b6b6b", "#9467bd", MODEL_COLORS["local"], MODEL_COLORS["federated"], MODEL_COLORS["lower"]])),
        tooltip=["policy:N", "maintenances:Q", "failures:Q", "open:Q", alt.Tooltip("wasted_cycles:Q", format=".0f"),
                 alt.Tooltip("cost:Q", format=",.0f")],
    ).properties(height=200)


def cost_sweep_chart(sweep: pd.DataFrame, baselines: pd.DataFrame, k: float) -> alt.LayerChart:
    """Total cost vs k for the local and federated policies, with the model-free policies as
    horizontal references and the chosen k marked."""
    lines = alt.Chart(sweep).mark_line(point=True).encode(
        x=alt.X("k:Q", title="maintain when predicted RUL ≤ k (cycles)"),
        y=alt.Y("cost:Q", title="total cost"),
        color=alt.Color("model:N", scale=MODEL_SCALE),
        tooltip=["model:N", "k:Q", "maintenances:Q", "failures:Q", "open:Q", alt.Tooltip("wasted_cycles:Q", format=".0f"),
                 alt.Tooltip("cost:Q", format=",.0f")],
    )
    refs = alt.Chart(baselines).mark_rule(strokeDash=[4, 4], color="#6b6b6b").encode(
        y="cost:Q", tooltip=["policy:N", alt.Tooltip("cost:Q", format=",.0f")])
    chosen = alt.Chart(pd.DataFrame({"k": [k]})).mark_rule(color="#999").encode(x="k:Q")
    return alt.layer(refs, chosen, lines).properties(height=320).interactive()
