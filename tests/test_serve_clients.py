"""`qcow2ovl serve` against clients that misbehave, and against being stopped: garbage,
over-long options, silent clients, clients gone mid-payload, unknown commands and requests out
of bounds (raw sockets and libnbd in strict mode 0); SIGTERM, SIGINT, the last client leaving
without ``-t``, and kill -9 mid-write; kill -9 of the server, and of the client, half-way
through an ``nbdcopy`` of four connections (its source, nbdkit with the pause filter, is held
still first, so the copy is caught in the middle every time). As in ``test_serve.py``,
``QCOW2OVL_SERVE_WITH=qemu-nbd`` runs the same tests against qemu-nbd, which proves they ask only
what qemu-nbd does.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import nbd_clients as nc
import pytest
import qemu_images as qi

KiB, MiB = 1024, 1 << 20
SIZE = nc.SIZE

pytestmark = nc.NEEDS_CLIENTS


# ---- 6. bad clients ---------------------------------------------------------------------------


@pytest.fixture
def persistent(tmp_path: Path, server_cmd: list[str]) -> Iterator[nc.Server]:
    """A server with `-t -e 2` on a fresh image holding 0x5a in its first 64 KiB."""
    image = nc.image(tmp_path, "disk.qcow2", "write -P 0x5a 0 64k")
    with nc.serving(server_cmd, image, tmp_path, "-t", "-e", "2") as server:
        yield server


def _works(server: nc.Server) -> None:
    """A well-behaved client is served: a raw one reads the first 64 KiB, qemu-io too."""
    assert server.sock is not None
    with nc.RawClient(server.sock) as c:
        assert c.go()[0] == SIZE
        reply, data = c.read(0, 64 * KiB)
        assert reply.error == 0 and data == b"\x5a" * (64 * KiB)
        c.disconnect()
    nc.qemu_io_nbd(server.uri(), "read -P 0x5a 0 64k")
    assert server.running(), server.describe()


def test_garbage_client_flags_close_only_that_connection(persistent: nc.Server) -> None:
    """Bytes that are not client flags (unknown flag bits) after the greeting: the server
    closes that connection and serves the next client."""
    assert persistent.sock is not None
    with nc.RawClient(persistent.sock) as c:
        flags = c.greeting()
        assert flags & nc.FLAG_FIXED_NEWSTYLE
        c.send(b"\xde\xad\xbe\xef" * 4)
        assert c.closed_by_server()
    _works(persistent)


@pytest.mark.parametrize("option", [nc.OPT_GO, 0x1234])
def test_an_option_of_4_gib_closes_only_that_connection(persistent: nc.Server, option: int) -> None:
    """An option header announcing 0xffffffff bytes of data: the server does not wait for
    them; it closes the connection (any replies before that are errors) and serves the next."""
    assert persistent.sock is not None
    with nc.RawClient(persistent.sock) as c:
        c.greeting()
        c.send_client_flags()
        c.send_option(option, b"", length=0xFFFFFFFF)
        replies: list[nc.OptReply] = []
        with pytest.raises(nc.Closed):
            while True:
                replies.append(c.opt_reply())
        assert all(r.is_error for r in replies), replies
    _works(persistent)


def test_unknown_option_and_unknown_export_are_answered(persistent: nc.Server) -> None:
    """An unknown option gets ERR_UNSUP, GO for a name not exported gets ERR_UNKNOWN, and the
    negotiation goes on to a GO that works; ABORT is acknowledged."""
    assert persistent.sock is not None
    with nc.RawClient(persistent.sock) as c:
        c.greeting()
        c.send_client_flags()
        c.send_option(0x1234, b"abc")
        unsup = c.opt_reply()
        c.send_option(nc.OPT_GO, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))
        unknown = c.opt_reply()
        c.send_option(nc.OPT_ABORT)
        ack = c.opt_reply()
    assert (unsup.option, unsup.type) == (0x1234, nc.REP_ERR_BIT | 1), unsup
    assert (unknown.option, unknown.type) == (nc.OPT_GO, nc.REP_ERR_BIT | 6), unknown
    assert (ack.option, ack.type) == (nc.OPT_ABORT, nc.REP_ACK), ack
    _works(persistent)


def test_a_silent_client_does_not_block_another(persistent: nc.Server) -> None:
    """With `-e 2`, a client that connects and sends nothing (it has had its greeting) holds
    one slot; another client is served meanwhile."""
    assert persistent.sock is not None
    with nc.RawClient(persistent.sock) as idle:
        idle.greeting()
        _works(persistent)
        nc.qemu_io_nbd(persistent.uri(), "write -P 0x61 1M 64k", "read -P 0x61 1M 64k")


def test_a_client_that_stalls_its_handshake_is_cut_off(
    tmp_path: Path, server_cmd: list[str]
) -> None:
    """`--handshake-limit 1`: a client that never sends its flags is disconnected by the
    server (the socket's own timeout is far longer), and the next client is served."""
    image = nc.image(tmp_path, "disk.qcow2", "write -P 0x5a 0 64k")
    with nc.serving(server_cmd, image, tmp_path, "-t", "--handshake-limit", "1") as server:
        assert server.sock is not None
        with nc.RawClient(server.sock) as stalled:
            stalled.greeting()
            with pytest.raises(nc.Closed):
                stalled.recv_exact(1)
        _works(server)


def test_a_client_gone_mid_payload_leaves_the_image_whole(
    tmp_path: Path, persistent: nc.Server
) -> None:
    """A WRITE announcing 1 MiB whose client sends 100 bytes and closes: that write is not
    carried out, the server keeps serving, and after it stops the image checks clean."""
    assert persistent.sock is not None
    with nc.RawClient(persistent.sock) as c:
        c.go()
        c.request(nc.CMD_WRITE, 0, MiB)
        c.send(b"\x99" * 100)
    _works(persistent)
    assert persistent.stop() == 0, persistent.describe()
    image = tmp_path / "disk.qcow2"
    assert qi.check_is_clean(qi.qemu_check(image))
    qi.qemu_io(image, "read -P 0x5a 0 64k", "read -P 0 64k 1M")


def test_unknown_command_gets_einval_and_the_connection_goes_on(persistent: nc.Server) -> None:
    """A request of an unknown type (99) and a read past the end, with simple replies, are
    answered EINVAL; the connection then serves a read."""
    assert persistent.sock is not None
    with nc.RawClient(persistent.sock) as c:
        c.go()
        c.request(99, 0, 512, cookie=7)
        unknown = c.simple_reply()
        past, _ = c.read(SIZE, 512, cookie=8)
        reply, data = c.read(0, 512, cookie=9)
    assert unknown == nc.SimpleReply(nc.EINVAL, 7)
    assert past == nc.SimpleReply(nc.EINVAL, 8)
    assert reply == nc.SimpleReply(0, 9) and data == b"\x5a" * 512


#: Requests out of bounds or with a wrong flag, sent by libnbd with its own checks off
#: (structured replies); each result is the errno name, or "ok".
LIBNBD_SCRIPT = r"""
import errno, json, sys
import nbd
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
size = h.get_size()
out = {"structured": h.get_structured_replies_negotiated()}
def attempt(name, f):
    try:
        f()
        out[name] = "ok"
    except nbd.Error as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
attempt("read_past_end", lambda: h.pread(512, size))
attempt("read_straddling_end", lambda: h.pread(1024, size - 512))
attempt("block_status_past_end", lambda: h.block_status(512, size, lambda *a: 0))
attempt("read_with_no_hole_flag", lambda: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE))
attempt("write_past_end", lambda: h.pwrite(b"x" * 512, size))
attempt("zero_past_end", lambda: h.zero(512, size))
attempt("trim_past_end", lambda: h.trim(512, size))
attempt("read_zero_length", lambda: h.pread(0, 0))
h.pwrite(b"\x5b" * 4096, 8192)
out["reads_back"] = h.pread(4096, 8192) == b"\x5b" * 4096
h.shutdown()
print(json.dumps(out))
"""


@pytest.mark.skipif(not nc.have_libnbd_python(), reason="needs python3-libnbd (system Python)")
def test_out_of_bounds_requests_from_libnbd(tmp_path: Path, persistent: nc.Server) -> None:
    """Through libnbd with strict mode off (structured replies): reads and block status past
    the end and a read with a write-only flag get EINVAL; writes, zeroes and trims past the
    end get EINVAL (qemu-nbd) or ENOSPC (the specification's SHOULD for writes); a read of 0
    bytes succeeds; the connection then writes and reads back; the image checks clean."""
    out = json.loads(nc.run_libnbd(LIBNBD_SCRIPT, persistent.uri()))
    einval, enospc = errno.errorcode[errno.EINVAL], errno.errorcode[errno.ENOSPC]
    assert out["structured"] is True
    for name in ("read_past_end", "read_straddling_end", "block_status_past_end"):
        assert out[name] == einval, (name, out)
    assert out["read_with_no_hole_flag"] == einval, out
    for name in ("write_past_end", "zero_past_end", "trim_past_end"):
        assert out[name] in (einval, enospc), (name, out)
    assert out["read_zero_length"] == "ok" and out["reads_back"] is True, out
    assert persistent.stop() == 0, persistent.describe()
    assert qi.check_is_clean(qi.qemu_check(tmp_path / "disk.qcow2"))


# ---- 7. stopping ----------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_server_cleanly(
    tmp_path: Path, server_cmd: list[str], sig: signal.Signals
) -> None:
    """With `-t`, writes through qemu-io, then SIGTERM (or SIGINT): the server exits 0 and
    removes its socket; the image checks clean (no leak either), holds the writes, and opens
    for writing (the lock is released)."""
    image = nc.image(tmp_path)
    with nc.serving(server_cmd, image, tmp_path, "-t") as server:
        nc.qemu_io_nbd(server.uri(), "write -P 0x71 0 1M", "write -z 256k 64k")
        nc.qemu_io_nbd(server.uri(), "write -P 0x72 5M 300k")
        assert server.stop(sig) == 0, server.describe()
        assert server.sock is not None and not server.sock.exists()
    report = qi.qemu_check(image)
    assert qi.check_is_clean(report), report
    qi.qemu_io(
        image,
        "read -P 0x71 0 256k",
        "read -P 0 256k 64k",
        "read -P 0x71 320k 704k",
        "read -P 0x72 5M 300k",
        "write -P 0x73 8M 4k",
    )


def test_without_persistent_the_last_client_ends_the_server(
    tmp_path: Path, server_cmd: list[str]
) -> None:
    """Without `-t` the server exits 0 once the last client that negotiated leaves. Clients that
    never reach the transmission phase (`nbdinfo --list`, an ABORT, garbage) do not count:
    the server still serves the next one."""
    image = nc.image(tmp_path)
    with nc.serving(server_cmd, image, tmp_path) as server:
        assert server.sock is not None
        nc.nbdinfo(server.uri(), "--list")
        with nc.RawClient(server.sock) as c:
            c.greeting()
            c.send_client_flags()
            c.send_option(nc.OPT_ABORT)
            assert c.opt_reply().type == nc.REP_ACK
        with nc.RawClient(server.sock) as c:
            c.greeting()
            c.send(b"\xff" * 4)
            assert c.closed_by_server()
        assert server.running(), server.describe()
        nc.qemu_io_nbd(server.uri(), "write -P 0x31 0 64k")
        assert server.wait() == 0, server.describe()
    assert qi.check_is_clean(qi.qemu_check(image))
    qi.qemu_io(image, "read -P 0x31 0 64k")


# ---- 8. killed -----------------------------------------------------------------------------


def test_sigkill_mid_write_loses_nothing_that_was_flushed(
    tmp_path: Path, server_cmd: list[str]
) -> None:
    """Writes acknowledged and flushed, more writes acknowledged but not flushed, and one
    still in flight, then SIGKILL: `qemu-img check` finds no corruption (leaks allowed), the
    flushed data is there, and the image opens for writing (the lock died with the process)."""
    image = nc.image(tmp_path)
    with nc.serving(server_cmd, image, tmp_path) as server:
        assert server.sock is not None
        with nc.RawClient(server.sock) as c:
            c.go()
            for i in range(4):
                assert c.write(i * MiB, bytes([0x40 + i]) * MiB, cookie=i).error == 0
            assert c.flush(cookie=10).error == 0
            for i in range(4, 8):
                assert c.write(i * MiB + 4 * KiB, bytes([0x40 + i]) * 60 * KiB).error == 0
            c.request(nc.CMD_WRITE, 12 * MiB, MiB, cookie=20)
            c.send(b"\x77" * MiB)
            assert server.stop(signal.SIGKILL) == -signal.SIGKILL, server.describe()
    nc.no_corruption(image)
    qi.qemu_io(image, *(f"read -P {0x40 + i:#x} {i}M 1M" for i in range(4)))
    qi.qemu_io(image, "write -P 0x01 15M 4k")


def _random_raw(tmp_path: Path, size: int) -> Path:
    path = tmp_path / "random.raw"
    with open(path, "wb") as f:
        for _ in range(size // (16 * MiB)):
            f.write(os.urandom(16 * MiB))
    return path


#: The size of the copies below: long enough that a copy is caught half-way.
COPY_SIZE = 256 * MiB


def _source_and_server(
    stack: contextlib.ExitStack, tmp_path: Path, server_cmd: list[str], image: Path
) -> tuple[Path, nc.PausableSource, nc.Server]:
    """A pausable nbdkit source of COPY_SIZE random bytes and a server (`-t -e 4`) of a new
    *image* as large, both kept running by *stack*; returns the raw file, source and server."""
    raw = _random_raw(tmp_path, COPY_SIZE)
    qi.create(image, COPY_SIZE)
    source = stack.enter_context(nc.pausable_source(raw, tmp_path))
    server = stack.enter_context(nc.serving(server_cmd, image, tmp_path, "-t", "-e", "4"))
    return raw, source, server


@pytest.mark.skipif(nc.NBDKIT is None, reason="needs nbdkit (its pause filter holds the source)")
def test_sigkill_during_an_nbdcopy_with_four_connections(
    tmp_path: Path, server_cmd: list[str]
) -> None:
    """`nbdcopy` writes 256 MiB of random data over four connections; a quarter in, its source
    is held still (every read it had asked for answered, so its writes are on their way) and the
    server is killed with SIGKILL. nbdcopy fails; `qemu-img check` finds no corruption (exit 0,
    or 3: leaked clusters only); the image opens for writing and reads back what it holds."""
    image = tmp_path / "disk.qcow2"
    with contextlib.ExitStack() as stack:
        _, source, server = _source_and_server(stack, tmp_path, server_cmd, image)
        with nc.copying(source.uri, server.uri()) as copy:
            copy.reach(25)
            source.pause()
            assert server.stop(signal.SIGKILL) == -signal.SIGKILL, server.describe()
            # nbdcopy may already have given up (its destination is gone), and then nbdkit
            # aborts as it answers it: the copy fails either way.
            source.resume_if_alive()
            assert copy.wait() != 0
    report = nc.no_corruption(image)
    assert report["_exit"] in (0, 3), report
    qi.qemu_io(image, "read 0 1M", "write -P 0x01 0 4k", "read -P 0x01 0 4k")


@pytest.mark.skipif(nc.NBDKIT is None, reason="needs nbdkit (its pause filter holds the source)")
def test_a_killed_nbdcopy_leaves_the_server_serving(tmp_path: Path, server_cmd: list[str]) -> None:
    """`nbdcopy -C 4` (four connections, all that `-e 4` allows, as
    `test_nbdcopy_in_with_four_connections` shows) is killed with SIGKILL a quarter in: the
    server frees its connections and serves the next client; a second `nbdcopy -C 4` then
    copies the whole disk, and after a clean stop the image is the source byte for byte and
    checks clean."""
    image = tmp_path / "disk.qcow2"
    with contextlib.ExitStack() as stack:
        raw, source, server = _source_and_server(stack, tmp_path, server_cmd, image)
        with nc.copying(source.uri, server.uri()) as copy:
            copy.reach(25)
            source.pause()
            copy.proc.kill()
            assert copy.wait() == -signal.SIGKILL
        # The paused source stays paused: nbdkit aborts on an assertion when it answers a
        # client that was killed meanwhile. The second copy reads the raw file itself.
        nc.qemu_io_nbd(server.uri(), "write -P 0x3d 0 64k", "read -P 0x3d 0 64k")
        assert server.running(), server.describe()
        with nc.copying(str(raw), server.uri()) as again:
            assert again.wait() == 0
        assert server.stop() == 0, server.describe()
    qi.qemu_img("compare", "-f", "qcow2", "-F", "raw", image, raw)
    assert qi.check_is_clean(qi.qemu_check(image))
