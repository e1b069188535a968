"""``qcow2ovl serve``: qemu-nbd's command line over :class:`qcow2ovl._core.NbdServer`.

``qcow2ovl serve [-k SOCKET | [-b ADDR] [-p PORT]] [-r] [-x NAME] [-D TEXT] [-e N] [-t]
[-A] [-B BITMAP] [--fork] [--pid-file FILE] [--discard MODE] [--detect-zeroes MODE]
[-l SNAPSHOT] [-U] [-f qcow2] [--cache MODE] [--overlap-check SPEC] IMAGE``
serves IMAGE until the last client leaves (or, with ``-t``, until SIGTERM or SIGINT), then
flushes it, releases its lock and exits 0. With ``--fork`` it goes to the background once it
listens; handed a listening socket by systemd (``LISTEN_FDS``/``LISTEN_PID``) it serves that one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import MutableMapping, Sequence
    from types import FrameType
    from typing import Any

_HELP = "serve an image over NBD, every write guarded (qemu-nbd syntax)"
_DESCRIPTION = (
    "Export IMAGE over NBD as qemu-nbd does: on a Unix socket (-k) or TCP (-b, -p; loopback "
    "port 10809 by default), or on the socket systemd hands over (LISTEN_FDS). Every write, "
    "zero and trim a client sends goes through the guarded engine, with every overlap check on. "
    "Without -t the server exits when its last client disconnects; SIGTERM and SIGINT stop it "
    "cleanly (requests in flight finish, the image is flushed and unlocked, exit status 0)."
)

#: The first descriptor systemd passes (``SD_LISTEN_FDS_START``).
FIRST_SOCKET_ACTIVATION_FD = 3

#: ``--discard`` values, as QEMU parses them, to the server's modes.
_DISCARD = {"ignore": "ignore", "off": "ignore", "unmap": "unmap", "on": "unmap"}
_DETECT_ZEROES = ("off", "on", "unmap")


class _Refused(Exception):
    """A startup check failed; the message is qemu-nbd's."""


class _Mode(argparse.Action):
    """``--discard`` and ``--detect-zeroes``, judged in command-line order as qemu-nbd judges
    them (``--detect-zeroes=unmap`` needs an earlier ``--discard=unmap``). The first refusal is
    kept in ``mode_error`` and reported by :func:`run` with status 1, as qemu-nbd reports it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        if namespace.mode_error is not None:
            return
        value = str(values)
        error = None
        if self.dest == "discard":
            if namespace.discard is not None:
                error = "--discard can only be specified once"
            elif value not in _DISCARD:
                error = f"Invalid discard mode `{value}'"
            else:
                namespace.discard = _DISCARD[value]
        elif value not in _DETECT_ZEROES:
            error = f"Failed to parse detect_zeroes mode: invalid parameter value: {value}"
        elif value == "unmap" and namespace.discard != "unmap":
            error = (
                "setting detect-zeroes to unmap is not allowed without setting discard "
                "operation to unmap"
            )
        else:
            namespace.detect_zeroes = value
        namespace.mode_error = error


class _Stop(Exception):
    """Raised by the signal handler to end serving."""


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``serve`` command to the ``qcow2ovl`` parser."""
    from qcow2ovl._cli_convert import CACHE_MODES

    p = sub.add_parser("serve", help=_HELP, description=_DESCRIPTION)
    p.add_argument("-k", "--socket", metavar="PATH", help="listen on this Unix socket")
    # No defaults here: with socket activation, giving -b or -p at all is refused.
    p.add_argument("-b", "--bind", metavar="ADDR", help="TCP address (127.0.0.1)")
    p.add_argument("-p", "--port", type=int, help="TCP port (10809)")
    p.add_argument("-r", "--read-only", action="store_true", help="export read-only")
    p.add_argument("-x", "--export-name", default="", metavar="NAME", help="the export's name")
    p.add_argument("-D", "--description", metavar="TEXT", help="the export's description")
    p.add_argument(
        "-e", "--shared", type=int, default=1, metavar="N", help="clients at once (default 1)"
    )
    p.add_argument(
        "-t", "--persistent", action="store_true", help="keep serving after the last client"
    )
    p.add_argument(
        "--fork",
        action="store_true",
        help="go to the background once serving; the foreground exits 0 then (1 with the error)",
    )
    p.add_argument(
        "--pid-file",
        metavar="FILE",
        help="write the server's pid there once it listens (locked while it serves)",
    )
    p.add_argument(
        "--discard",
        action=_Mode,
        metavar="MODE",
        help="what a client's trim does: ignore (the default) or unmap",
    )
    p.add_argument(
        "--detect-zeroes",
        action=_Mode,
        metavar="MODE",
        help="writes of zeros become zero writes: off (the default), on, or unmap "
        "(needs an earlier --discard=unmap)",
    )
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
    from qcow2ovl._cli_secrets import add_arguments

    add_arguments(p)
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
    p.set_defaults(func=run, mode_error=None, discard=None, detect_zeroes=None)


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def _number(text: str | None) -> int | None:
    """A decimal number as ``strtoul`` reads one whole (leading blanks allowed), else None."""
    if text is None or not re.fullmatch(r"\s*\+?[0-9]+", text):
        return None
    return int(text)


def socket_activation(environ: MutableMapping[str, str] | None = None) -> int:
    """How many listening sockets systemd handed over (from descriptor 3 on), as qemu-nbd reads
    ``LISTEN_PID`` and ``LISTEN_FDS``: 0 unless ``LISTEN_PID`` is this process. When they are
    for it, both variables are removed from *environ* (default: the process environment), so
    that no child of the server takes them for its own, and the descriptors are made
    close-on-exec. A descriptor that is not open is refused (:class:`_Refused`)."""
    env = os.environ if environ is None else environ
    if _number(env.get("LISTEN_PID")) != os.getpid():
        return 0
    count = _number(env.get("LISTEN_FDS"))
    if count is None:
        return 0
    env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_PID", None)
    import fcntl

    for fd in range(FIRST_SOCKET_ACTIVATION_FD, FIRST_SOCKET_ACTIVATION_FD + count):
        try:
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
        except OSError as e:
            raise _Refused(
                f"Socket activation failed: invalid file descriptor fd = {fd}: {e.strerror}"
            ) from None
    return count


def _activation_conflict(args: argparse.Namespace, count: int) -> str | None:
    """Why options given with an activated socket are refused (qemu-nbd's words), if they are."""
    if args.socket is not None:
        return "Unix socket can't be set when using socket activation"
    if args.bind is not None:
        return "The interface can't be set when using socket activation"
    if args.port is not None:
        return "TCP port number can't be set when using socket activation"
    if count > 1:
        return "qcow2ovl serve does not support socket activation with LISTEN_FDS > 1"
    return None


def _fork() -> int | None:
    """``--fork``, as qemu-nbd daemonizes: the foreground process copies what the server writes
    on its standard error to its own until the server lets go of it, then returns the exit
    status (1 if anything was written, else 0). The server (returned None) runs in a new
    session, a grandchild of the foreground, with its standard input and output on /dev/null
    and its standard error on the pipe until :func:`_release`. Called before the image is
    opened, while the process has only its main thread."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child:
        os.close(write_end)
        said = False
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while True:
                chunk = pipe.read(1024)
                if not chunk:
                    break
                said = True
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
        os.waitpid(child, 0)
        return 1 if said else 0
    os.close(read_end)
    if os.fork():
        os._exit(0)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    os.dup2(write_end, 2)
    os.close(write_end)
    return None


def _release() -> None:
    """The forked server is ready: its standard error goes to /dev/null (as qemu-nbd's without
    ``-v``), which closes the pipe and lets the foreground process exit 0."""
    sys.stderr.flush()
    os.dup2(1, 2)


def _write_pid_file(path: str) -> int:
    """Writes this process's pid to *path* as qemu-nbd does: created if need be (mode 0600),
    locked with a POSIX write lock (a second server with the same pid file is refused while the
    first runs), emptied and written. Returns the descriptor, to keep open while serving: the
    lock lasts as long. The file stays after the server exits, as qemu-nbd's does."""
    import fcntl

    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise _Refused(f"Could not create '{path}': {e.strerror}") from None
        opened = os.fstat(fd)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise _Refused(f"Cannot lock pid file: {e.strerror}") from None
        # The file locked must be the one at the path now (another server may have replaced it
        # between the open and the lock).
        try:
            now = os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            continue
        if (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    except OSError:
        os.close(fd)
        raise _Refused("Failed to write pid file") from None
    return fd


def run(args: argparse.Namespace) -> int:
    """Run ``qcow2ovl serve``; 0 after a clean stop, 1 on failure."""
    from qcow2ovl._cli_convert import _cache
    from qcow2ovl._cli_errors import fail

    if args.mode_error is not None:
        return fail(args.mode_error)
    cache = _cache(args.cache)
    if args.fmt not in (None, "qcow2"):
        return fail(f"serve: format '{args.fmt}' is not supported (qcow2 is)")
    if args.shared < 1:
        return fail(f"Invalid shared device number '{args.shared}'")
    read_only = args.read_only or args.snapshot is not None
    if args.force_share and not read_only:
        return fail("--force-share requires a read-only export (-r)")
    try:
        activated = socket_activation()
    except _Refused as e:
        return fail(str(e))
    if activated:
        conflict = _activation_conflict(args, activated)
        if conflict is not None:
            return fail(conflict)
    if args.fork:
        status = _fork()
        if status is not None:
            return status
    # From here on the process is the server (in the background with --fork): SIGTERM and
    # SIGINT stop it cleanly even while it starts.
    old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _serve(args, cache, read_only, activated > 0)
    except (_Stop, KeyboardInterrupt):
        return 0
    except _Refused as e:
        return fail(str(e))
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        sys.stdout.flush()


def _serve(args: argparse.Namespace, cache: str, read_only: bool, activated: bool) -> int:
    """Opens the image, listens, announces readiness (pid file; with --fork, the foreground's
    exit) and serves until stopped."""
    from qcow2ovl import _core
    from qcow2ovl._cli_secrets import OptionsError, resolve
    from qcow2ovl.image import open as open_image

    try:
        target = resolve(args, args.image)
    except OptionsError as e:
        raise _Refused(f"Failed to blk_new_open '{args.image}': {e}") from None
    image = open_image(
        target.filename,
        writable=not read_only,
        snapshot=args.snapshot,
        force_share=args.force_share,
        overlap_check=args.overlap_check,
        cache_mode=cache,  # type: ignore[arg-type]  # checked by _cache
        secret=target.secret,
    )
    try:
        # qemu-nbd opens the whole chain before it serves: a missing backing file is an error
        # at startup, not at the first read.
        image._core.open_backing_chain()
    except OSError as exc:
        from qcow2ovl._cli_errors import missing_file

        image.close()
        reason = missing_file(target.filename, exc).removeprefix(
            f"Could not open '{target.filename}': "
        )
        raise _Refused(f"Failed to blk_new_open '{args.image}': {reason}") from None
    if image.info.encrypted and target.secret is None:
        # qemu-nbd serves no encrypted image without its secret.
        image.close()
        raise _Refused(f"Failed to blk_new_open '{args.image}': {_core.KEY_SECRET_REQUIRED}")
    with contextlib.ExitStack() as held, image:
        server = _core.NbdServer(
            image._core,
            socket=args.socket,
            bind="127.0.0.1" if args.bind is None else args.bind,
            port=10809 if args.port is None else args.port,
            listen_fd=FIRST_SOCKET_ACTIVATION_FD if activated else None,
            export_name=args.export_name,
            description=args.description,
            shared=args.shared,
            persistent=args.persistent,
            handshake_timeout=float(args.handshake_limit),
            allocation_depth=args.allocation_depth,
            bitmap=args.bitmap,
            discard=args.discard or "ignore",
            detect_zeroes=args.detect_zeroes or "off",
        )
        if args.pid_file:
            held.callback(os.close, _write_pid_file(args.pid_file))
        if args.fork:
            _release()
        server.serve()
    return 0
