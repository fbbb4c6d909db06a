"""The turbofed dashboard's entry point: `streamlit run dashboard/app.py -- --store PATH`
(what `turbofed dashboard` runs).

It sets up the page, the sidebar shared by every page (which store, auto-refresh) and the
navigation; the pages are the scripts in `screens/`, each a thin layout over `views`.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from turbofed.dashboard import common

HERE = Path(__file__).resolve().parent

st.set_page_config(page_title="turbofed", page_icon=":material/flight:", layout="wide")

# The default page is served at / whatever its url_path ("overview" keeps the name free for the alias).
FLEET = st.Page(HERE / "screens" / "fleet.py", title="Fleet", icon=":material/flight:", url_path="overview", default=True)


def _fleet_alias() -> None:
    """/fleet: Streamlit serves the default page at / only, so its own name would say "Page not found"."""
    st.switch_page(FLEET)


PAGES = [
    FLEET,
    st.Page(HERE / "screens" / "federated.py", title="Federated vs local", icon=":material/compare_arrows:",
            url_path="federated"),
    st.Page(HERE / "screens" / "rounds.py", title="Rounds", icon=":material/sync:", url_path="rounds"),
    st.Page(HERE / "screens" / "economics.py", title="Maintenance economics", icon=":material/payments:",
            url_path="economics"),
    st.Page(_fleet_alias, title="Fleet", url_path="fleet", visibility="hidden"),
]
page = st.navigation(PAGES)

with st.sidebar:
    st.caption("**turbofed**: federated predictive maintenance")
    st.caption(f"Results store: `{common.resolve_store_path()}`")
    st.toggle("Auto-refresh", value=True, key=common.AUTO_KEY,
              help="Re-read the store periodically, e.g. while `turbofed demo` runs.")
    st.select_slider("Every (seconds)", options=common.REFRESH_CHOICES, value=common.DEFAULT_REFRESH_S,
                     key=common.EVERY_KEY, disabled=not st.session_state.get(common.AUTO_KEY, True))
    st.divider()

page.run()
