"""Test-wide settings."""

import pytest
from hypothesis import settings

# Timing is never part of a test here (machines differ, CI shares cores): no hypothesis deadline.
settings.register_profile("qcow2ovl", deadline=None)
settings.load_profile("qcow2ovl")


@pytest.fixture(scope="session")
def server_cmd() -> list[str]:
    """The argv prefix of the server under test (see the module's docstring)."""
    import nbd_clients as nc

    kind = nc.server_kind()
    if kind == "ours":
        why = nc.ours_missing()
        if why is not None:
            pytest.fail(
                f"{nc.SERVE_WITH_ENV}=ours, but this qcow2ovl has no `serve` command: {why} "
                f"({nc.SERVE_WITH_ENV}=qemu-nbd runs these tests against qemu-nbd)",
                pytrace=False,
            )
    return nc.server_prefix(kind)
