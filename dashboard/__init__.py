"""The Streamlit dashboard: reads the results store, never the broker."""
