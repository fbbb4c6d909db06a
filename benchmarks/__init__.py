"""Accuracy and system benchmarks. They print JSON and are not run as tests."""
