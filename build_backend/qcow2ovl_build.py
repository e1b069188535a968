"""The project's PEP 517 build backend: maturin's, with the portable wheel as the default.

maturin's own backend builds a wheel tagged ``linux_x86_64`` (``--compatibility off``) unless the
build is given arguments, and does not take ``zig = true`` from ``[tool.maturin]``. This wrapper
passes ``--zig --compatibility manylinux2014`` to every wheel build on glibc Linux that was given
no build arguments of its own, so a plain ``pip wheel .`` or ``pip install .`` gives the same
``manylinux2014`` / ``manylinux_2_17`` wheel as the README's command: zig (the ``ziglang``
package, a build requirement) links the extension against glibc 2.17's symbols.

Arguments given with ``--config-settings=build-args=...`` or ``MATURIN_PEP517_ARGS`` replace the
default; ``MATURIN_PEP517_ARGS=--compatibility=off`` builds with the system linker alone.
Editable installs are left as maturin builds them.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from typing import Any

import maturin
from maturin import (  # noqa: F401  (the rest of the backend, unchanged)
    build_editable,
    build_sdist,
    get_requires_for_build_editable,
    get_requires_for_build_sdist,
    get_requires_for_build_wheel,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)

PORTABLE_ARGS = ["--zig", "--compatibility", "manylinux2014"]


def _portable_host() -> bool:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        import ziglang  # noqa: F401
    except ImportError:
        print("qcow2ovl build: ziglang is not installed; building for this machine only")
        return False
    return True


def _settings(config_settings: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    given = config_settings or {}
    if "build-args" in given or "maturin.build-args" in given:
        return config_settings
    if os.environ.get("MATURIN_PEP517_ARGS") or not _portable_host():
        return config_settings
    return {**given, "build-args": PORTABLE_ARGS}


def build_wheel(
    wheel_directory: str,
    config_settings: Mapping[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    """maturin's ``build_wheel`` with :data:`PORTABLE_ARGS` unless told otherwise."""
    return str(maturin.build_wheel(wheel_directory, _settings(config_settings), metadata_directory))
