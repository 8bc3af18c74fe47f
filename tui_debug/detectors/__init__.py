"""Detectors: turn per-step observations into findings. Each is a small unit with its own tests."""
