"""Turbofan data: NASA's C-MAPSS (download, verify, load) and a synthetic fleet for offline use.

`manifest.toml` names the archive and NASA's SHA-256 of every file. Downloaded files go to
`data/cmapss/` (git-ignored) unless a data folder is given.
"""
