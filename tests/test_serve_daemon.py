"""`qcow2ovl serve` started as a service: `--fork` (the server goes to the background once it
serves), `--pid-file` (written once it listens, locked while it runs, left at exit) and systemd's
socket activation (`LISTEN_FDS`/`LISTEN_PID`: the server listens on the socket it was handed on
descriptor 3). As in ``test_serve.py``, ``QCOW2OVL_SERVE_WITH=qemu-nbd`` runs the same tests
against qemu-nbd, which proves they ask only what qemu-nbd does; its messages are the ones
asserted (after the program's name).

What qemu-nbd does that the tests pin: with `--fork` the foreground exits 0 with nothing
printed once the server listens and has written its pid file, or 1 with the server's error;
the server runs in a session of its own with its standard streams on /dev/null. Socket
activation needs `LISTEN_PID` to be the server's pid; `-k`, `-b` and `-p` are refused with it,
so are two sockets, a descriptor that is not open and one that is not a socket; a Unix socket
it was handed is left in place at exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import nbd_clients as nc
import pytest
import qemu_images as qi

SIZE = nc.SIZE

pytestmark = nc.NEEDS_CLIENTS


def _message(proc: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a server that refused to start, without the program's name."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc
    return lines[0].split(": ", 1)[1]


# ---- --fork ------------------------------------------------------------------------------------


def test_fork_returns_once_serving_and_the_server_runs_detached(
    tmp_path: Path, server_cmd: list[str]
) -> None:
    """`--fork -t`: the foreground exits 0 and prints nothing; by then the pid file names the
    server, which is another process, leads a session of its own, has its standard streams on
    /dev/null, and serves. SIGTERM stops it cleanly: the socket is removed, the pid file stays
    (as qemu-nbd leaves it), the image checks clean, holds the write and opens for writing."""
    image = nc.image(tmp_path)
    with nc.forked(server_cmd, image, tmp_path, "-t") as daemon:
        assert daemon.foreground.stdout == ""
        assert daemon.pid != os.getpid() and nc.alive(daemon.pid)
        assert os.getsid(daemon.pid) == daemon.pid
        streams = [os.readlink(f"/proc/{daemon.pid}/fd/{fd}") for fd in (0, 1, 2)]
        assert streams == [os.devnull] * 3, streams
        (export,) = nc.nbdinfo(daemon.uri(), "--no-content")["exports"]
        nc.qemu_io_nbd(daemon.uri(), "write -P 0x6b 1M 64k", "read -P 0x6b 1M 64k")
        daemon.stop()
        assert not daemon.sock.exists()
        assert daemon.pid_file.read_text() == f"{daemon.pid}\n"
    assert export["export-size"] == SIZE
    assert qi.check_is_clean(qi.qemu_check(image))
    qi.qemu_io(image, "read -P 0x6b 1M 64k", "write -P 0x01 0 4k")


def test_fork_without_t_ends_after_the_last_client(tmp_path: Path, server_cmd: list[str]) -> None:
    """Without `-t` the forked server exits once its client leaves, as in the foreground."""
    image = nc.image(tmp_path)
    with nc.forked(server_cmd, image, tmp_path) as daemon:
        nc.qemu_io_nbd(daemon.uri(), "write -P 0x6c 0 64k")
        nc.wait_gone(daemon.pid)
        assert not daemon.sock.exists()
    qi.qemu_io(image, "read -P 0x6c 0 64k")


@pytest.mark.parametrize("failure", ["missing-image", "unknown-bitmap", "locked-image"])
def test_fork_reports_a_startup_failure_in_the_foreground(
    tmp_path: Path, server_cmd: list[str], failure: str
) -> None:
    """A server that cannot start under `--fork` (no image there, `-B` naming no bitmap, the
    image locked by another writer) prints its error through the foreground process, which
    exits 1; no pid file is written."""
    image = nc.image(tmp_path)
    pid_file = tmp_path / "failed.pid"
    options: list[str] = []
    expected = {
        "missing-image": "No such file or directory",
        "unknown-bitmap": "Bitmap 'nope' is not found",
        "locked-image": 'Failed to get "write" lock',
    }[failure]
    if failure == "missing-image":
        image = tmp_path / "none.qcow2"
    if failure == "unknown-bitmap":
        options = ["-B", "nope"]
    with contextlib.ExitStack() as stack:
        if failure == "locked-image":
            stack.enter_context(nc.serving(server_cmd, image, tmp_path))
        proc = nc.run_server(
            server_cmd,
            "--fork",
            "-f",
            "qcow2",
            "-k",
            tmp_path / "failed.sock",
            "--pid-file",
            pid_file,
            *options,
            image,
        )
    assert proc.returncode == 1 and expected in proc.stderr, proc
    assert proc.stdout == ""
    assert not pid_file.exists()


# ---- --pid-file --------------------------------------------------------------------------------


def test_a_pid_file_in_use_is_refused(tmp_path: Path, server_cmd: list[str]) -> None:
    """A second server given the pid file of a running one is refused (the first holds a lock
    on it), and the file still names the first; after the first stops the file is left there.
    A pid file that cannot be created is refused with the system's reason."""
    with nc.serving(server_cmd, nc.image(tmp_path), tmp_path, "-t") as first:
        second = nc.run_server(
            server_cmd,
            "-f",
            "qcow2",
            "-k",
            tmp_path / "second.sock",
            "--pid-file",
            first.pid_file,
            nc.image(tmp_path, "second.qcow2"),
        )
        assert first.running(), first.describe()
        assert first.pid_file.read_text() == f"{first.proc.pid}\n"
        assert first.stop() == 0, first.describe()
    assert _message(second) == "Cannot lock pid file: Resource temporarily unavailable"
    assert first.pid_file.read_text() == f"{first.proc.pid}\n"
    nowhere = tmp_path / "no-such-dir" / "x.pid"
    uncreated = nc.run_server(
        server_cmd,
        "-f",
        "qcow2",
        "-k",
        tmp_path / "third.sock",
        "--pid-file",
        nowhere,
        nc.image(tmp_path, "third.qcow2"),
    )
    assert _message(uncreated) == f"Could not create '{nowhere}': No such file or directory"


# ---- socket activation -------------------------------------------------------------------------


def _run_activated(
    server_cmd: list[str],
    sockets: Sequence[int],
    *args: str | Path,
    listen_fds: int | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.CompletedProcess[str]:
    """The server run to its end with *sockets* on descriptors 3 and 4 and LISTEN_FDS (default:
    how many), LISTEN_PID its own pid."""
    return subprocess.run(
        nc.activate_argv(server_cmd, "-f", "qcow2", *args),
        capture_output=True,
        text=True,
        timeout=6 * nc.TIMEOUT,
        stdin=subprocess.DEVNULL,
        pass_fds=(*sockets, *pass_fds),
        env=nc.activation_env(sockets, listen_fds),
        check=False,
    )


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_socket_activation_serves_the_inherited_socket(
    tmp_path: Path, server_cmd: list[str], kind: str
) -> None:
    """Handed a listening socket on descriptor 3 (Unix or TCP) with LISTEN_FDS=1 and LISTEN_PID
    its pid, the server takes no socket option and serves on that socket; SIGTERM stops it with
    status 0, leaving a Unix socket's file in place (it did not make it)."""
    image = nc.image(tmp_path)
    with nc.activated(server_cmd, image, tmp_path, "-t", kind=kind) as server:
        (export,) = nc.nbdinfo(server.uri(), "--no-content")["exports"]
        nc.qemu_io_nbd(server.uri(), "write -P 0x5c 2M 64k")
        nc.qemu_io_nbd(server.uri(), "read -P 0x5c 2M 64k")
        assert server.stop() == 0, server.describe()
    assert export["export-size"] == SIZE
    if kind == "unix":
        assert server.sock is not None and server.sock.exists()
    assert qi.check_is_clean(qi.qemu_check(image))
    qi.qemu_io(image, "read -P 0x5c 2M 64k")


def test_socket_activation_with_fork(tmp_path: Path, server_cmd: list[str]) -> None:
    """`--fork` with an activated socket: the foreground exits 0 once the server serves; the
    server (a grandchild, not the process LISTEN_PID named) serves the inherited socket."""
    image = nc.image(tmp_path)
    sock, path, _ = nc.listening_socket("unix", tmp_path)
    pid_file = tmp_path / "forked.pid"
    with sock:
        fg = _run_activated(
            server_cmd, [sock.fileno()], "--fork", "-t", "--pid-file", pid_file, image
        )
    assert fg.returncode == 0 and fg.stderr == "", fg
    pid = int(pid_file.read_text())
    assert path is not None
    try:
        nc.qemu_io_nbd(nc.unix_uri(path), "write -P 0x5d 0 64k", "read -P 0x5d 0 64k")
    finally:
        os.kill(pid, signal.SIGTERM)
        nc.wait_gone(pid)
    qi.qemu_io(image, "read -P 0x5d 0 64k")


@pytest.mark.parametrize(
    ("option", "refusal"),
    [
        (["-k", "SOCK"], "Unix socket can't be set when using socket activation"),
        (["-b", "127.0.0.1"], "The interface can't be set when using socket activation"),
        (["-p", "10809"], "TCP port number can't be set when using socket activation"),
    ],
    ids=["k", "b", "p"],
)
def test_socket_activation_refuses_a_socket_of_its_own(
    tmp_path: Path, server_cmd: list[str], option: list[str], refusal: str
) -> None:
    """With an activated socket, `-k`, `-b` and `-p` are refused in qemu-nbd's words."""
    sock, _, _ = nc.listening_socket("unix", tmp_path)
    option = [str(tmp_path / "own.sock") if o == "SOCK" else o for o in option]
    with sock:
        proc = _run_activated(server_cmd, [sock.fileno()], *option, nc.image(tmp_path))
    assert _message(proc) == refusal


def test_socket_activation_refuses_what_is_not_one_listening_socket(
    tmp_path: Path, server_cmd: list[str]
) -> None:
    """Two sockets (LISTEN_FDS=2), LISTEN_FDS=1 without descriptor 3, and a regular file on
    descriptor 3 are refused: the server serves one socket, and only a socket."""
    image = nc.image(tmp_path)
    first, _, _ = nc.listening_socket("unix", tmp_path)
    second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    second.bind(str(tmp_path / "second.sock"))
    second.listen(1)
    with first, second:
        two = _run_activated(server_cmd, [first.fileno(), second.fileno()], image)
    closed = _run_activated(server_cmd, [], image, listen_fds=1)
    with open(image, "rb") as f:
        not_socket = _run_activated(server_cmd, [f.fileno()], image)
    assert _message(two).endswith(" does not support socket activation with LISTEN_FDS > 1")
    assert (
        _message(closed) == "Socket activation failed: invalid file descriptor fd = 3: "
        "Bad file descriptor"
    )
    assert _message(not_socket) == (
        "Failed to use socket activation: Unable to query remote socket address: "
        "Socket operation on non-socket"
    )


def test_listen_variables_for_another_process_are_ignored(
    tmp_path: Path, server_cmd: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """LISTEN_FDS with a LISTEN_PID that is not the server's is not for it: the server listens
    on its own `-k` socket as if they were not set."""
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_PID", "1")
    image = nc.image(tmp_path)
    with nc.serving(server_cmd, image, tmp_path, "-t") as server:
        nc.qemu_io_nbd(server.uri(), "write -P 0x5e 0 4k", "read -P 0x5e 0 4k")
        assert server.stop() == 0, server.describe()


def test_activation_removes_its_variables_from_the_environment() -> None:
    """Ours: the variables meant for this process are removed (so no child takes them for its
    own), LISTEN_FDS=0 included; variables for another pid are left alone."""
    if nc.server_kind() != "ours":
        pytest.skip("the environment of qemu-nbd's process cannot be looked at from here")
    from qcow2ovl._cli_serve import socket_activation

    mine = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0", "LISTEN_FDNAMES": "x", "A": "b"}
    assert socket_activation(mine) == 0
    assert mine == {"LISTEN_FDNAMES": "x", "A": "b"}
    other = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert socket_activation(dict(other)) == 0
    kept = dict(other)
    socket_activation(kept)
    assert kept == other


# ---- the chain is opened before serving ---------------------------------------------------------


def test_a_missing_backing_file_fails_at_startup_as_in_qemu_nbd(tmp_path: Path) -> None:
    """qemu-nbd opens the whole backing chain before it listens: a missing backing file is an
    error at startup, in its words, not at a client's first read."""
    sub = tmp_path / "sub"
    sub.mkdir()
    qi.qemu_img("create", "-q", "-f", "qcow2", sub / "base.qcow2", "1M")
    qi.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", sub / "top.qcow2")
    (sub / "base.qcow2").unlink()
    results = []
    for exe in ([sys.executable, "-m", "qcow2ovl", "serve"], [str(qi.QEMU_NBD)]):
        proc = subprocess.run(
            [*exe, "-r", "-k", str(tmp_path / "s.sock"), "sub/top.qcow2"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=tmp_path,
            check=False,
        )
        results.append((proc.returncode, proc.stderr.split(": ", 1)[-1]))
    assert results[0] == results[1]
    assert results[0][1].startswith(
        "Failed to blk_new_open 'sub/top.qcow2': Could not open backing"
    )
