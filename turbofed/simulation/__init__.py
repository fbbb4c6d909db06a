"""Simulation on one host: a broker launcher, the C-MAPSS replay (datasets as live sensor
traffic), engine-to-site assignment, and the one-command demo. Never runs on a device."""
