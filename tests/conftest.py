"""Test-wide settings and fixtures."""

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# Timing is never part of a test here (machines differ, CI shares cores): no hypothesis deadline.
settings.register_profile("qcow2ovl", deadline=None)
settings.load_profile("qcow2ovl")


@pytest.fixture(autouse=True)
def _keeps_the_working_directory() -> Iterator[None]:
    """Fail a test that leaves the process in another working directory: the folder it left us
    in is removed with its `tmp_path`, and every later `os.getcwd()` would fail far from the
    cause (use `monkeypatch.chdir`)."""
    before = os.getcwd()
    yield
    after = os.getcwd()
    if after != before:
        os.chdir(before)
        pytest.fail(f"the test left the working directory at {after} (use monkeypatch.chdir)")


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


@pytest.fixture(scope="module")
def module_tmp_path(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A folder for the files a test module's tests share, removed once they are done unless
    one of them failed: the module-wide counterpart of `tmp_path` under the
    `tmp_path_retention_policy = "failed"` of pyproject.toml (the suite writes tens of GB in all,
    and a CI machine may have little disk)."""
    failed_before = request.session.testsfailed
    path = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)
