"""Serving an image over NBD: :func:`serve`, ``qcow2ovl serve``'s server as a context manager.

The server (``_core.NbdServer``, in Rust) runs in a background thread without the GIL; every
write a client sends goes through the image's guarded engine, with every overlap check on by
default, so any NBD client (``qemu-img``, ``qemu-io``, ``nbdcopy``, a VM) writes it guarded.
"""

from __future__ import annotations

import contextlib
import os
import threading
import urllib.parse

from qcow2ovl import _core

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Literal

    from qcow2ovl.options import OverlapCheckSpec

    CacheMode = Literal["writeback", "writethrough", "unsafe", "none", "directsync"]
    Discard = Literal["ignore", "unmap"]
    DetectZeroes = Literal["off", "on", "unmap"]


def uri(
    *,
    socket: str | os.PathLike[str] | None = None,
    bind: str = "127.0.0.1",
    port: int = 10809,
    export_name: str = "",
) -> str:
    """The NBD URI of an export: ``nbd+unix:///NAME?socket=PATH`` or ``nbd://HOST:PORT/NAME``."""
    name = urllib.parse.quote(export_name)
    if socket is not None:
        return f"nbd+unix:///{name}?socket={urllib.parse.quote(os.fspath(socket))}"
    host = f"[{bind}]" if ":" in bind else bind
    return f"nbd://{host}:{port}/{name}"


@contextlib.contextmanager
def serve(
    path: str | os.PathLike[str],
    *,
    socket: str | os.PathLike[str] | None = None,
    bind: str = "127.0.0.1",
    port: int = 0,
    read_only: bool = False,
    export_name: str = "",
    description: str | None = None,
    shared: int = 16,
    allocation_depth: bool = True,
    bitmap: str | None = None,
    discard: Discard = "ignore",
    detect_zeroes: DetectZeroes = "off",
    snapshot: str | None = None,
    force_share: bool = False,
    overlap_check: OverlapCheckSpec = "all",
    cache_mode: CacheMode = "writeback",
    secret: str | bytes | None = None,
) -> Iterator[str]:
    """Serve the qcow2 image at *path* over NBD while the ``with`` block runs; yields the URI
    clients connect to.

    It listens on a Unix socket at *socket*, or else on TCP at *bind* (loopback by default)
    and *port* (0: a free port, chosen by the system). The image is opened writable unless
    *read_only* or *snapshot* (an internal snapshot's disk, served read-only), with QEMU's image
    locks, so no other writer can use it meanwhile; *force_share* (read-only only) shares it
    with writers. Up to *shared* clients are served at once, all through the one engine (so
    ``CAN_MULTI_CONN`` holds: a flush on any connection flushes everything). The metadata
    contexts ``base:allocation``, (with *allocation_depth*) ``qemu:allocation-depth`` and (with
    *bitmap*, a persistent bitmap's name) ``qemu:dirty-bitmap:NAME`` are offered. Writes the guard
    refuses are answered ``EIO``; the image is then marked corrupt, as for a direct write.

    *discard* and *detect_zeroes* are qemu-nbd's ``--discard`` and ``--detect-zeroes``, with its
    defaults: trims are answered and ignored, and zero writes keep their clusters allocated,
    unless *discard* is ``"unmap"``; with *detect_zeroes* ``"on"`` a write whose data is all
    zeros is made a zero write (``"unmap"``, which needs *discard* ``"unmap"``: one that may free
    the clusters). Bad values raise ``ValueError``.

    *secret* unlocks an encrypted image (see :func:`qcow2ovl.open`): clients read and write
    plaintext, and every write is enciphered before it reaches the file.

    Leaving the block stops the server: connections finish the requests they have read, the
    image is flushed and closed, and its lock released. Errors of :func:`qcow2ovl.open`,
    ``OSError`` (the socket) and ``ValueError`` (options that do not fit, an unknown *bitmap*)
    are raised before the block runs.
    """
    from qcow2ovl.image import open as open_image

    writable = not read_only and snapshot is None
    image = open_image(
        path,
        writable=writable,
        snapshot=snapshot,
        force_share=force_share,
        overlap_check=overlap_check,
        cache_mode=cache_mode,
        secret=secret,
    )
    try:
        server = _core.NbdServer(
            image._core,
            socket=None if socket is None else os.fspath(socket),
            bind=bind,
            port=port,
            export_name=export_name,
            description=description,
            shared=shared,
            persistent=True,
            allocation_depth=allocation_depth,
            bitmap=bitmap,
            discard=discard,
            detect_zeroes=detect_zeroes,
        )
        failure: list[BaseException] = []

        def run() -> None:
            try:
                server.serve()
            except BaseException as exc:  # reported when the block ends
                failure.append(exc)

        thread = threading.Thread(target=run, name="qcow2ovl-nbd", daemon=True)
        thread.start()
        try:
            yield uri(socket=socket, bind=bind, port=server.port or port, export_name=export_name)
        finally:
            server.stop()
            thread.join()
        if failure:
            raise failure[0]
    finally:
        image.close()


__all__ = ["serve", "uri"]
