"""Mosquitto configuration shipped with turbofed (`mosquitto.conf`), found by the broker launcher."""
