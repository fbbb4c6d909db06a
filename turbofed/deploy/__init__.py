"""Deployment: offline install bundles for edge devices (`turbofed flash`)."""
