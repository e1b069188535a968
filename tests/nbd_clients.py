"""NBD plumbing for tests/test_serve.py: starting and stopping a server (``qcow2ovl serve`` or
qemu-nbd, which take the same options), the NBD tools as clients (``nbdinfo``, ``qemu-io``,
``nbdcopy``, libnbd's Python binding under the system Python), and a raw-socket client that
speaks just enough of the fixed newstyle handshake and the simple-reply transmission phase to
send what well-behaved clients never send.

Nothing here imports qcow2ovl. Timeouts only keep a broken server from hanging the run; no test
measures time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import pytest
import qemu_images as qi

StrPath = Union[str, Path]

#: Which server the tests run: ``ours`` (``qcow2ovl serve``, the default) or ``qemu-nbd``.
SERVE_WITH_ENV = "QCOW2OVL_SERVE_WITH"

QEMU_NBD = shutil.which("qemu-nbd")
QEMU_IO = shutil.which("qemu-io")
NBDINFO = shutil.which("nbdinfo")
NBDCOPY = shutil.which("nbdcopy")
NBDKIT = shutil.which("nbdkit")

#: The marks of a test module that runs real NBD clients beside qemu-nbd.
NEEDS_CLIENTS = [
    pytest.mark.skipif(not qi.env_has_qemu(), reason="needs qemu-img and qemu-io"),
    pytest.mark.skipif(QEMU_NBD is None, reason="needs qemu-nbd (the reference server)"),
    pytest.mark.skipif(
        NBDINFO is None or NBDCOPY is None, reason="needs nbdinfo and nbdcopy (libnbd-bin)"
    ),
]
#: libnbd's Python binding (Debian's python3-libnbd) is built for the system Python only.
SYSTEM_PYTHON = "/usr/bin/python3"

#: How long a server may take to start or stop, and a client to get an answer (no test asserts
#: on time: these only turn a hang into a failure).
TIMEOUT = 10.0

# ---- the protocol's numbers (https://github.com/NetworkBlockDevice/nbd, doc/proto.md) ------

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_ABORT = 2
OPT_GO = 7

REP_ACK = 1
REP_INFO = 3
REP_ERR_BIT = 1 << 31
INFO_EXPORT = 0

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3

EINVAL = 22


# ---- the server under test --------------------------------------------------------------------


def server_kind() -> str:
    """``ours`` or ``qemu-nbd``, from the environment (``ours`` when unset)."""
    kind = os.environ.get(SERVE_WITH_ENV, "ours") or "ours"
    if kind not in ("ours", "qemu-nbd"):
        raise ValueError(f"{SERVE_WITH_ENV}={kind!r}: expected 'ours' or 'qemu-nbd'")
    return kind


def server_prefix(kind: str) -> list[str]:
    """The argv before the options: qemu-nbd, or ``python -m qcow2ovl serve``."""
    if kind == "qemu-nbd":
        return [QEMU_NBD or "qemu-nbd"]
    return [sys.executable, "-m", "qcow2ovl", "serve"]


def ours_missing() -> str | None:
    """Why ``qcow2ovl serve`` cannot run (the message of its ``--help``), or None when it can."""
    proc = subprocess.run(
        [sys.executable, "-m", "qcow2ovl", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode == 0:
        return None
    last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
    # argparse lists every command it knows after "(choose from": not needed here
    return f"`python -m qcow2ovl serve --help`: {last.split(' (choose from')[0]}"


def unix_uri(sock: StrPath, name: str = "") -> str:
    """The NBD URI of export *name* on a Unix socket."""
    return f"nbd+unix:///{name}?socket={sock}"


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A running server process, its socket (or TCP port) and its log."""

    proc: subprocess.Popen[bytes]
    argv: list[str]
    log: Path
    pid_file: Path
    sock: Path | None = None
    port: int | None = None
    stopped: bool = field(default=False)

    def uri(self, name: str = "") -> str:
        if self.sock is not None:
            return unix_uri(self.sock, name)
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def describe(self) -> str:
        """The command line, exit status and log, for assertion messages."""
        return (
            f"server: {' '.join(self.argv)}\nexit: {self.proc.poll()}\n"
            f"--- server log ---\n{self.log_text().strip()}"
        )

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = TIMEOUT) -> int:
        """The exit status once the server has exited by itself (within *timeout*)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not exit\n{self.describe()}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        """Send *sig* and return the exit status (negative: killed by a signal)."""
        if self.running():
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL if still running, and reap (for `finally`)."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=TIMEOUT)


def start_server(
    prefix: Sequence[str],
    image: StrPath,
    directory: StrPath,
    *options: str,
    port: int | None = None,
    name: str = "server",
) -> Server:
    """Start ``PREFIX -f qcow2 OPTIONS (-k DIR/NAME.sock | -p PORT -b 127.0.0.1) --pid-file ...
    IMAGE`` and wait until it serves: both servers write the pid file only once they listen
    (qemu-nbd makes its socket file before it opens the image, and leaves it behind when that
    fails, so the socket file alone proves nothing). Raises AssertionError with the log when
    the server exits first or is not ready within TIMEOUT."""
    d = Path(directory)
    pid_file = d / f"{name}.pid"
    log = d / f"{name}.log"
    sock = None if port is not None else d / f"{name}.sock"
    for stale in (pid_file, sock):
        if stale is not None:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    where = ["-k", str(sock)] if sock is not None else ["-p", str(port), "-b", "127.0.0.1"]
    argv = [*prefix, "-f", "qcow2", *where, "--pid-file", str(pid_file), *options, str(image)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    server = Server(proc, argv, log, pid_file, sock=sock, port=port)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited before serving\n{server.describe()}")
            if _pid_written(pid_file, proc.pid) and (sock is None or sock.exists()):
                return server
            if time.monotonic() > deadline:
                raise AssertionError(f"the server was not ready in time\n{server.describe()}")
            time.sleep(0.02)
    except BaseException:
        server.kill()
        raise


def _pid_written(pid_file: Path, pid: int) -> bool:
    try:
        text = pid_file.read_text()
    except OSError:
        return False
    return text.endswith("\n") and text.strip() == str(pid)


@contextlib.contextmanager
def serving(
    prefix: Sequence[str],
    image: StrPath,
    directory: StrPath,
    *options: str,
    port: int | None = None,
    name: str = "server",
) -> Iterator[Server]:
    """`start_server` for a ``with`` block; the server is killed (if still running) after it."""
    server = start_server(prefix, image, directory, *options, port=port, name=name)
    try:
        yield server
    finally:
        server.kill()


# ---- a server in the background (--fork) and socket activation -------------------------------


def wait_gone(pid: int, timeout: float = TIMEOUT) -> None:
    """Wait until process *pid* (not necessarily a child) has exited: its pidfd becomes
    readable then. AssertionError if it is still running after *timeout*."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(timeout * 1000):
            raise AssertionError(f"process {pid} did not exit")
    finally:
        os.close(fd)


def alive(pid: int) -> bool:
    """Whether process *pid* exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@dataclass
class Daemon:
    """A server that went to the background (``--fork``): its pid (from the pid file), its
    socket, and what the foreground process printed."""

    pid: int
    sock: Path
    pid_file: Path
    foreground: subprocess.CompletedProcess[str]

    def uri(self, name: str = "") -> str:
        return unix_uri(self.sock, name)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send *sig* and wait until the process is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
        wait_gone(self.pid)


def run_server(
    prefix: Sequence[str], *args: StrPath, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``PREFIX ARGS`` to its end (a server that fails, or the foreground of ``--fork``)."""
    argv = [*prefix, *(str(a) for a in args)]
    return _run_to_end(argv, env, f"the server's foreground did not exit: {' '.join(argv)}")


def _run_to_end(
    argv: list[str], env: dict[str, str] | None, hung: str
) -> subprocess.CompletedProcess[str]:
    """*argv* run to its end with its output captured; *hung* is the failure past the time
    limit."""
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=6 * TIMEOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(hung) from e


@contextlib.contextmanager
def forked(
    prefix: Sequence[str], image: StrPath, directory: StrPath, *options: str
) -> Iterator[Daemon]:
    """``PREFIX --fork -f qcow2 -k DIR/fork.sock --pid-file DIR/fork.pid OPTIONS IMAGE``: the
    foreground must exit 0 with nothing on stderr, leaving the server serving; it is killed (if
    still running) after the block."""
    d = Path(directory)
    sock, pid_file = d / "fork.sock", d / "fork.pid"
    fg = run_server(
        prefix, "--fork", "-f", "qcow2", "-k", sock, "--pid-file", pid_file, *options, image
    )
    assert fg.returncode == 0 and fg.stderr == "", fg
    daemon = Daemon(int(pid_file.read_text()), sock, pid_file, fg)
    try:
        yield daemon
    finally:
        if alive(daemon.pid):
            daemon.stop(signal.SIGKILL)


#: Puts the socket at descriptor ``$QCOW2OVL_TEST_FD`` on descriptor 3 (and another at
#: ``$QCOW2OVL_TEST_FD2`` on 4), sets ``LISTEN_FDS`` and ``LISTEN_PID`` (``self``: this
#: process's pid, which the program keeps), then execs ``argv[1:]``: what systemd does for a
#: socket-activated service.
ACTIVATE = r"""
import os, sys
for var, target in (("QCOW2OVL_TEST_FD", 3), ("QCOW2OVL_TEST_FD2", 4)):
    fd = os.environ.pop(var, None)
    if fd is None:
        continue
    fd = int(fd)
    if fd == target:
        os.set_inheritable(fd, True)
    else:
        os.dup2(fd, target)
        os.close(fd)
pid = os.environ["LISTEN_PID"]
os.environ["LISTEN_PID"] = str(os.getpid()) if pid == "self" else pid
os.execvp(sys.argv[1], sys.argv[1:])
"""


def activation_env(
    fds: Sequence[int], listen_fds: int | None = None, listen_pid: str = "self"
) -> dict[str, str]:
    """The environment for ACTIVATE: the sockets *fds* go to 3 (and 4), ``LISTEN_FDS`` is
    *listen_fds* (default: how many)."""
    env = dict(os.environ)
    for var, fd in zip(("QCOW2OVL_TEST_FD", "QCOW2OVL_TEST_FD2"), fds):
        env[var] = str(fd)
    env["LISTEN_FDS"] = str(len(fds) if listen_fds is None else listen_fds)
    env["LISTEN_PID"] = listen_pid
    return env


def activate_argv(prefix: Sequence[str], *args: StrPath) -> list[str]:
    """The argv that runs ``PREFIX ARGS`` through ACTIVATE."""
    return [sys.executable, "-c", ACTIVATE, *prefix, *(str(a) for a in args)]


def listening_socket(
    kind: str, directory: StrPath
) -> tuple[socket.socket, Path | None, int | None]:
    """A listening socket as systemd would make it: Unix at DIR/activated.sock, or TCP on a
    free loopback port. Returns it with its path or port."""
    if kind == "unix":
        path = Path(directory) / "activated.sock"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.listen(16)
        return s, path, None
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s, None, int(s.getsockname()[1])


@contextlib.contextmanager
def activated(
    prefix: Sequence[str], image: StrPath, directory: StrPath, *options: str, kind: str = "unix"
) -> Iterator[Server]:
    """A server started with a listening socket on descriptor 3 (socket activation) and no
    socket option of its own, ready once its pid file is written (the socket accepts
    connections from the start: the kernel queues them). The test's copy of the socket is
    closed once the server has it. Killed (if still running) after the block."""
    d = Path(directory)
    pid_file, log = d / "activated.pid", d / "activated.log"
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()
    sock, path, port = listening_socket(kind, d)
    argv = activate_argv(prefix, "-f", "qcow2", "--pid-file", pid_file, *options, image)
    with sock, open(log, "wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            pass_fds=(sock.fileno(),),
            env=activation_env([sock.fileno()]),
        )
    server = Server(proc, argv, log, pid_file, sock=path, port=port)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not _pid_written(pid_file, proc.pid):
            if proc.poll() is not None:
                raise AssertionError(f"the server exited before serving\n{server.describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the server was not ready in time\n{server.describe()}")
            time.sleep(0.02)
        yield server
    finally:
        server.kill()


# ---- a source that can be held still: nbdkit's pause filter ---------------------------------


@dataclass
class PausableSource:
    """A file served by nbdkit through its pause filter: :meth:`pause` returns once every
    request it had received is answered, and holds every later one until :meth:`resume`."""

    uri: str
    control: socket.socket

    def _say(self, command: bytes) -> None:
        self.control.sendall(command)
        assert self.control.recv(1) == command.upper(), command

    def pause(self) -> None:
        self._say(b"p")

    def resume(self) -> None:
        self._say(b"r")

    def resume_if_alive(self) -> None:
        """:meth:`resume`, unless nbdkit is gone: it aborts on an assertion when it answers a
        client that went away while paused (nbdkit's bug, not the server's under test)."""
        with contextlib.suppress(ConnectionError, AssertionError):
            self.resume()


@contextlib.contextmanager
def pausable_source(path: StrPath, directory: StrPath) -> Iterator[PausableSource]:
    """nbdkit serving *path* (read-only) on DIR/source.sock with the pause filter, ready once its
    pid file is written (it writes it once it listens); stopped after the block."""
    assert NBDKIT is not None, "nbdkit is not installed"
    d = Path(directory)
    sock, ctl, pid_file = d / "source.sock", d / "source.ctl", d / "source.pid"
    argv = [NBDKIT, "-f", "-r", "-U", str(sock), "-P", str(pid_file), "--filter=pause"]
    argv += ["file", str(path), f"pause-control={ctl}"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not _pid_written(pid_file, proc.pid):
            assert proc.poll() is None, f"nbdkit exited: {argv}"
            assert time.monotonic() < deadline, f"nbdkit was not ready in time: {argv}"
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
            control.settimeout(TIMEOUT)
            control.connect(str(ctl))
            yield PausableSource(unix_uri(sock), control)
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=TIMEOUT)


@dataclass
class Copy:
    """A running ``nbdcopy`` and the pipe it reports its progress on."""

    proc: subprocess.Popen[bytes]
    progress: Any

    def reach(self, percent: int) -> None:
        """Wait until nbdcopy reports at least *percent* per cent copied (its ``N/100`` lines)."""
        while True:
            line = self.progress.readline()
            assert line, f"nbdcopy ended before {percent}%: exit {self.proc.wait()}"
            if int(line.split(b"/")[0]) >= percent:
                return

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=6 * TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError("nbdcopy hung") from None


@contextlib.contextmanager
def copying(source: str, destination: str, connections: int = 4) -> Iterator[Copy]:
    """``nbdcopy -C N -T N --progress=FD SOURCE DESTINATION`` in the background; killed (if still
    running) after the block."""
    assert NBDCOPY is not None, "nbdcopy is not installed"
    read_end, write_end = os.pipe()
    n = str(connections)
    argv = [NBDCOPY, "-C", n, "-T", n, f"--progress={write_end}", source, destination]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=(write_end,)
    )
    os.close(write_end)
    with os.fdopen(read_end, "rb") as progress:
        try:
            yield Copy(proc, progress)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


# ---- NBD tools as clients ------------------------------------------------------------------


class ToolError(AssertionError):
    """A client tool failed; the message carries its command line, status and output."""

    def __init__(self, argv: Sequence[str], rc: int, out: str, err: str) -> None:
        self.returncode = rc
        self.stdout = out
        self.stderr = err
        super().__init__(
            f"command failed (exit {rc}): {' '.join(argv)}\n"
            f"--- stdout ---\n{out.strip()}\n--- stderr ---\n{err.strip()}"
        )


def tool(argv: Sequence[StrPath], *, ok: Sequence[int] = (0,)) -> subprocess.CompletedProcess[str]:
    """Run a client tool with TIMEOUT-bounded patience; ToolError unless its status is in *ok*."""
    args = [str(a) for a in argv]
    try:
        proc = subprocess.run(
            args, capture_output=True, text=True, timeout=6 * TIMEOUT, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"client hung: {' '.join(args)}") from e
    if proc.returncode not in ok:
        raise ToolError(args, proc.returncode, proc.stdout, proc.stderr)
    return proc


def nbdinfo(uri: str, *options: str) -> dict[str, Any]:
    """``nbdinfo --json OPTIONS URI``, parsed."""
    assert NBDINFO is not None, "nbdinfo is not installed (Debian: libnbd-bin)"
    return dict(json.loads(tool([NBDINFO, "--json", *options, uri]).stdout))


def nbdinfo_map(uri: str, context: str) -> list[dict[str, Any]]:
    """``nbdinfo --map=CONTEXT --json URI``: extents, adjacent ones of one type merged (a
    server may split a run across replies; the map is the same)."""
    assert NBDINFO is not None, "nbdinfo is not installed (Debian: libnbd-bin)"
    out = tool([NBDINFO, f"--map={context}", "--json", uri]).stdout
    merged: list[dict[str, Any]] = []
    for e in json.loads(out):
        last = merged[-1] if merged else None
        if last is not None and last["type"] == e["type"]:
            assert last["offset"] + last["length"] == e["offset"], (last, e)
            last["length"] += e["length"]
        else:
            merged.append(dict(e))
    return merged


QEMU_IO_FAILURES = ("failed", "error", "Error", "can't open", "Pattern verification")


def qemu_io_nbd(uri: str, *commands: str) -> str:
    """``qemu-io -f raw -c CMD ... URI``: the export as a raw disk. qemu-io exits 0 even when a
    command fails, so the output is also searched for its failure words."""
    assert QEMU_IO is not None, "qemu-io is not installed"
    argv = [QEMU_IO, "-f", "raw"]
    for cmd in commands:
        argv += ["-c", cmd]
    argv.append(uri)
    proc = tool(argv)
    out = proc.stdout + proc.stderr
    if any(word in out for word in QEMU_IO_FAILURES):
        raise ToolError(argv, proc.returncode, proc.stdout, proc.stderr)
    return out


def have_libnbd_python() -> bool:
    """Whether the system Python imports libnbd's binding (``nbd``)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return False
    proc = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True, timeout=60, check=False
    )
    return proc.returncode == 0


def run_libnbd(script: str, *args: str) -> str:
    """Run *script* under the system Python (where ``import nbd`` works) with *args* as
    ``sys.argv[1:]``; its stdout, or ToolError."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    argv = [SYSTEM_PYTHON, "-c", script, *args]
    proc = _run_to_end(argv, env, "libnbd script hung")
    if proc.returncode != 0:
        raise ToolError(argv[:2] + ["<script>", *args], proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


# ---- a raw client ----------------------------------------------------------------------------


class Closed(Exception):
    """The server closed the connection (EOF, or a reset) where the client expected bytes."""


@dataclass(frozen=True)
class OptReply:
    """One option reply: the option it answers, its type and its data."""

    option: int
    type: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.type & REP_ERR_BIT)


@dataclass(frozen=True)
class SimpleReply:
    """A simple reply: its error (0: success) and cookie."""

    error: int
    cookie: int


class RawClient:
    """One connection, driven byte by byte; every receive waits at most TIMEOUT."""

    def __init__(self, sock_path: StrPath) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(sock_path))
        self.handshake_flags: int | None = None

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        """Exactly *n* bytes, or Closed when the server closes first."""
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except ConnectionResetError as e:
                raise Closed(f"reset after {len(buf)} of {n} bytes") from e
            if not chunk:
                raise Closed(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def closed_by_server(self) -> bool:
        """Whether the server closes the connection (reads until EOF or a reset, discarding
        anything it still sends; False only if it sends nothing more and keeps it open, which
        the TIMEOUT turns into an AssertionError rather than a hang)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            raise AssertionError("the server neither answered nor closed the connection") from None

    def greeting(self) -> int:
        """Read the 18-byte fixed newstyle greeting; its handshake flags."""
        data = self.recv_exact(18)
        magic, opt, flags = struct.unpack(">8sQH", data)
        assert magic == NBDMAGIC and opt == IHAVEOPT, data
        self.handshake_flags = flags
        return int(flags)

    def send_client_flags(self, flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> None:
        self.send(struct.pack(">I", flags))

    def send_option(self, option: int, data: bytes = b"", length: int | None = None) -> None:
        """An option header (with *length*, default ``len(data)``), then *data*."""
        n = len(data) if length is None else length
        self.send(struct.pack(">QII", IHAVEOPT, option, n) + data)

    def opt_reply(self) -> OptReply:
        head = self.recv_exact(20)
        magic, option, rtype, length = struct.unpack(">QIII", head)
        assert magic == OPT_REPLY_MAGIC, head
        return OptReply(option, rtype, self.recv_exact(length))

    def go(self, name: str = "") -> tuple[int, int]:
        """Negotiate: greeting, client flags, ``OPT_GO`` for *name* with no info requests, replies
        until the ACK. Returns the export's (size, transmission flags)."""
        self.greeting()
        self.send_client_flags()
        raw = name.encode()
        self.send_option(OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        size = flags = None
        while True:
            r = self.opt_reply()
            assert r.option == OPT_GO and not r.is_error, r
            if r.type == REP_INFO and struct.unpack(">H", r.data[:2])[0] == INFO_EXPORT:
                size, flags = struct.unpack(">QH", r.data[2:12])
            if r.type == REP_ACK:
                break
        assert size is not None and flags is not None, "no NBD_INFO_EXPORT before the ACK"
        return int(size), int(flags)

    def request(
        self, cmd: int, offset: int, length: int, *, cookie: int = 1, flags: int = 0
    ) -> None:
        """A request header (the payload, if any, is sent separately)."""
        self.send(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length))

    def simple_reply(self) -> SimpleReply:
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        return SimpleReply(int(error), int(cookie))

    def read(self, offset: int, length: int, cookie: int = 1) -> tuple[SimpleReply, bytes]:
        """A READ with a simple reply: (reply, data; empty after an error)."""
        self.request(CMD_READ, offset, length, cookie=cookie)
        reply = self.simple_reply()
        return reply, (self.recv_exact(length) if reply.error == 0 else b"")

    def write(self, offset: int, data: bytes, cookie: int = 1) -> SimpleReply:
        self.request(CMD_WRITE, offset, len(data), cookie=cookie)
        self.send(data)
        return self.simple_reply()

    def flush(self, cookie: int = 1) -> SimpleReply:
        self.request(CMD_FLUSH, 0, 0, cookie=cookie)
        return self.simple_reply()

    def disconnect(self) -> None:
        self.request(CMD_DISC, 0, 0)


# ---- images for the serve tests ----------------------------------------------------------

#: The size of the serve tests' images, and their cluster size.
SIZE = 16 << 20
CLUSTER = 64 << 10


def image(tmp_path: Path, name: str = "disk.qcow2", *commands: str) -> Path:
    path = tmp_path / name
    qi.create(path, SIZE)
    if commands:
        qi.qemu_io(path, *commands)
    return path


def no_corruption(image: Path) -> dict[str, Any]:
    """`qemu-img check`: no corruption and no check error (leaked clusters allowed: a server
    killed mid-allocation may leak, which is harmless). Returns the report."""
    report = qi.qemu_check(image)
    assert report["_exit"] in (0, 3), report
    assert report.get("check-errors", 0) == 0, report
    assert report.get("corruptions", 0) == 0, report
    return report
