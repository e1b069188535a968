"""What a fleet worker runs: :func:`check_one` checks one image into its JSON line, and
:func:`expand_paths` turns files, directories and globs into the images to check.

A leaf: both the local pool (:mod:`qcow2ovl.fleet`) and the Dask cluster
(:mod:`qcow2ovl._fleet_dask`) import it, and it imports neither.
"""

from __future__ import annotations

import os

from qcow2ovl._format import QCOW2_MAGIC

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from typing import Any

#: The exit status of ``qemu-img check`` for an image that could not be checked.
EXIT_FAILED = 1
#: ``qemu-img check``'s status for an image whose format it cannot check.
EXIT_NOT_SUPPORTED = 63


# ---- the work each worker does ------------------------------------------------------------


def _host() -> str:
    import socket

    return socket.gethostname()


def error_record(path: str, message: str, status: int = EXIT_FAILED) -> dict[str, Any]:
    """The JSON line of an image that could not be checked."""
    return {"filename": path, "exit-status": status, "host": _host(), "error": message}


def check_one(path: str, repair: str | None = None, force_share: bool = False) -> dict[str, Any]:
    """Check one image in this process; returns its JSON line (never raises for the image).

    This is the task a worker runs: it takes a path and returns a small dict, so it travels
    to a Dask worker and back as a few hundred bytes.
    """
    try:
        return _check_one(path, repair, force_share)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - a worker reports, it does not crash
        # (A Rust panic surfaces as pyo3's PanicException, a BaseException.)
        return error_record(path, f"{type(exc).__name__}: {exc}")


def _open_failure(path: str, exc: BaseException) -> str:
    """What ``qemu-img check`` says when it cannot open *path*: ``Could not open 'PATH': ...``
    (qcow2ovl's own errors already start with the path, in QEMU's words)."""
    from qcow2ovl.errors import LockError, Qcow2Error

    if isinstance(exc, LockError):
        return f"Could not open '{path}': {exc}"
    if isinstance(exc, OSError) and not isinstance(exc, Qcow2Error) and exc.strerror:
        return f"Could not open '{path}': {exc.strerror}"
    return str(exc)


def _check_one(path: str, repair: str | None, force_share: bool) -> dict[str, Any]:
    from qcow2ovl.check import CheckResult, check
    from qcow2ovl.errors import LockError, Qcow2Error, UnsupportedError
    from qcow2ovl.image import open as open_image

    result: CheckResult
    if repair is not None:
        try:
            result = check(path, repair=repair)
        except LockError as exc:
            return error_record(path, _open_failure(path, exc))
        except (Qcow2Error, OSError, ValueError) as exc:
            # Includes a leaks-only repair that must rebuild the refcount structure.
            return error_record(path, f"check: {exc}")
    else:
        try:
            image = open_image(path, overlap_check="none", force_share=force_share)
        except (Qcow2Error, OSError, ValueError) as exc:
            return error_record(path, _open_failure(path, exc))
        with image:
            try:
                result = image.check()
            except UnsupportedError as exc:
                return error_record(path, f"check: {exc}", EXIT_NOT_SUPPORTED)
            except (Qcow2Error, OSError, ValueError) as exc:
                return error_record(path, f"check: {exc}")
    record = result.as_qemu_dict()
    record["filename"] = path
    record["exit-status"] = result.exit_code
    record["host"] = _host()
    return record


# ---- which images: files, directories, globs ------------------------------------------------


def _starts_with_magic(path: str) -> bool:
    """Whether a directory entry is worth checking: a qcow2 image, or a file whose first bytes
    cannot be read (so that its error is reported rather than hidden)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == QCOW2_MAGIC
    except OSError:
        return True


def _walk(directory: str) -> Iterator[str]:
    import stat

    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                mode = os.stat(path).st_mode
            except OSError:
                continue  # a dangling symlink: nothing to check
            if stat.S_ISREG(mode) and _starts_with_magic(path):
                yield path


def expand_paths(patterns: Sequence[str]) -> list[str]:
    """The images that *patterns* name, in order, each once.

    A file (or a path that does not exist: its check reports that) is taken as it is; a
    directory gives every regular file under it, recursively, that starts with the qcow2 magic
    (or cannot be read); a pattern with glob characters (``*``, ``?``, ``[``, ``**``) gives what
    it matches, each match by the same two rules; a pattern that matches nothing is kept, so
    that its result says "No such file or directory".
    """
    import glob

    out: list[str] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        if path not in seen:
            seen.add(path)
            out.append(path)

    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else []
        for path in matches or [pattern]:
            if os.path.isdir(path):
                for found in _walk(path):
                    add(found)
            else:
                add(path)
    return out


def split_host(argument: str) -> tuple[str | None, str]:
    """``HOST:/PATH`` as ``(HOST, /PATH)``; anything else as ``(None, argument)``. HOST is a
    name or an IPv4 address, or an IPv6 address in brackets; PATH must be absolute."""
    head, sep, tail = argument.partition(":/")
    if head.startswith("[") and "]:/" in argument:
        head, _, tail = argument[1:].partition("]:/")
        return head, "/" + tail
    if sep and head and all(c.isalnum() or c in "._-" for c in head):
        return head, "/" + tail
    return None, argument
