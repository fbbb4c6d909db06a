"""The dashboard's pages, one module each (Streamlit runs them by path)."""
