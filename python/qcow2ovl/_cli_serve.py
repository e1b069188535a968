"""``qcow2ovl serve``: qemu-nbd's command line over :class:`qcow2ovl._core.NbdServer`.

``qcow2ovl serve [-k SOCKET | [-b ADDR] [-p PORT]] [-r] [-x NAME] [-D TEXT] [-e N] [-t]
[-A] [-B BITMAP] [--pid-file FILE] [-l SNAPSHOT] [-U] [-f qcow2] [--cache MODE]
[--overlap-check SPEC] IMAGE``
serves IMAGE until the last client leaves (or, with ``-t``, until SIGTERM or SIGINT), then
flushes it, releases its lock and exits 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from types import FrameType
    from typing import Any

_HELP = "serve an image over NBD, every write guarded (qemu-nbd syntax)"
_DESCRIPTION = (
    "Export IMAGE over NBD as qemu-nbd does: on a Unix socket (-k) or TCP (-b, -p; loopback "
    "port 10809 by default). Every write, zero and trim a client sends goes through the "
    "guarded engine, with every overlap check on. Without -t the server exits when its last "
    "client disconnects; SIGTERM and SIGINT stop it cleanly (requests in flight finish, the "
    "image is flushed and unlocked, exit status 0)."
)


class _Stop(Exception):
    """Raised by the signal handler to end serving."""


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``serve`` command to the ``qcow2ovl`` parser."""
    from qcow2ovl._cli_convert import CACHE_MODES

    p = sub.add_parser("serve", help=_HELP, description=_DESCRIPTION)
    p.add_argument("-k", "--socket", metavar="PATH", help="listen on this Unix socket")
    p.add_argument(
        "-b", "--bind", default="127.0.0.1", metavar="ADDR", help="TCP address (127.0.0.1)"
    )
    p.add_argument("-p", "--port", type=int, default=10809, help="TCP port (10809)")
    p.add_argument("-r", "--read-only", action="store_true", help="export read-only")
    p.add_argument("-x", "--export-name", default="", metavar="NAME", help="the export's name")
    p.add_argument("-D", "--description", metavar="TEXT", help="the export's description")
    p.add_argument(
        "-e", "--shared", type=int, default=1, metavar="N", help="clients at once (default 1)"
    )
    p.add_argument(
        "-t", "--persistent", action="store_true", help="keep serving after the last client"
    )
    p.add_argument("--pid-file", metavar="FILE", help="write the server's pid there")
    p.add_argument(
        "-A",
        "--allocation-depth",
        action="store_true",
        help="also offer the qemu:allocation-depth metadata context",
    )
    p.add_argument(
        "-B",
        "--bitmap",
        metavar="NAME",
        help="also offer the persistent bitmap NAME as qemu:dirty-bitmap:NAME",
    )
    p.add_argument(
        "--handshake-limit",
        type=int,
        default=10,
        metavar="N",
        help="seconds a client may take to negotiate (default 10)",
    )
    p.add_argument(
        "-l",
        "--load-snapshot",
        dest="snapshot",
        metavar="SNAPSHOT",
        help="export this internal snapshot's disk (read-only)",
    )
    from qcow2ovl import _cli_options

    _cli_options.add_force_share(p)
    p.add_argument("-f", "--format", dest="fmt", metavar="FMT", help="qcow2")
    p.add_argument(
        "--cache",
        default="writeback",
        metavar="MODE",
        help=f"the image's cache mode ({', '.join(CACHE_MODES)}; default writeback)",
    )
    p.add_argument(
        "--overlap-check",
        default="all",
        help="which metadata types guard the writes (QEMU's overlap-check syntax; default: all)",
    )
    p.add_argument("image", metavar="IMAGE")
    p.set_defaults(func=run)


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def run(args: argparse.Namespace) -> int:
    """Run ``qcow2ovl serve``; 0 after a clean stop, 1 on failure."""
    from qcow2ovl import _core
    from qcow2ovl._cli_convert import _cache
    from qcow2ovl._cli_errors import fail
    from qcow2ovl.image import open as open_image

    cache = _cache(args.cache)
    if args.fmt not in (None, "qcow2"):
        return fail(f"serve: format '{args.fmt}' is not supported (qcow2 is)")
    if args.shared < 1:
        return fail(f"Invalid shared device number '{args.shared}'")
    read_only = args.read_only or args.snapshot is not None
    if args.force_share and not read_only:
        return fail("--force-share requires a read-only export (-r)")
    image = open_image(
        args.image,
        writable=not read_only,
        snapshot=args.snapshot,
        force_share=args.force_share,
        overlap_check=args.overlap_check,
        cache_mode=cache,  # type: ignore[arg-type]  # checked by _cache
    )
    with image:
        server = _core.NbdServer(
            image._core,
            socket=args.socket,
            bind=args.bind,
            port=args.port,
            export_name=args.export_name,
            description=args.description,
            shared=args.shared,
            persistent=args.persistent,
            handshake_timeout=float(args.handshake_limit),
            allocation_depth=args.allocation_depth,
            bitmap=args.bitmap,
        )
        if args.pid_file:
            with open(args.pid_file, "w", encoding="ascii") as f:
                f.write(f"{os.getpid()}\n")
        old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            server.serve()
        except (_Stop, KeyboardInterrupt):
            pass
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            if args.pid_file:
                with contextlib.suppress(OSError):
                    os.unlink(args.pid_file)
    sys.stdout.flush()
    return 0
