"""Test-wide settings."""

from hypothesis import settings

# Timing is never part of a test here (machines differ, CI shares cores): no hypothesis deadline.
settings.register_profile("qcow2ovl", deadline=None)
settings.load_profile("qcow2ovl")
