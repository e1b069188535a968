"""QEMU's image locks, with QEMU as the other process in both directions.

Every row runs a real qemu-io, qemu-img or qemu-nbd beside a qcow2ovl handle: QEMU holds the
image and we must be refused (or not) exactly as another QEMU would be, and we hold it and QEMU
must be refused (or not) exactly as by another QEMU. The locked bytes themselves are compared
with QEMU's for each kind of open. Every refusal leaves the files byte-identical.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import qcow2ovl
import qemu_images as qi

pytestmark = pytest.mark.skipif(not qi.env_has_qemu(), reason="needs qemu-img")

MiB = 1 << 20
WRITER = [100, 101, 103, 201, 203]
READER = [100, 201, 203]
NOT_SHARED = 'Failed to get "write" lock'
HELD = 'Failed to get shared "write" lock'


def locked_bytes(path: Path) -> list[int]:
    """The lock bytes (QEMU's 100-104, 200-204) that some open file description holds, as a
    write-lock probe from a fresh descriptor sees them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        held = []
        for byte in [*range(100, 105), *range(200, 205)]:
            probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
            answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe)
            if struct.unpack("hhqqi4x", answer)[0] != fcntl.F_UNLCK:
                held.append(byte)
        return held
    finally:
        os.close(fd)


def wait_locked(
    path: Path, proc: subprocess.Popen[bytes], expect: list[int] | None = None
) -> list[int]:
    """Waits (bounded by a number of polls, not a clock the test asserts on) until something
    holds locks on *path* (exactly *expect*, when given); returns them."""
    for _ in range(400):
        held = locked_bytes(path)
        if held and (expect is None or held == expect):
            return held
        if proc.poll() is not None:
            raise AssertionError(f"the holder exited: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.025)
    raise AssertionError(f"nothing locked {path}")


class QemuIo:
    """An interactive qemu-io holding an image open, run command by command."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            ["qemu-io", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.out = b""
        self.read_prompt()

    def read_prompt(self) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while not self.out.endswith(b"qemu-io> "):
            ready, _, _ = select.select([fd], [], [], 60)
            chunk = os.read(fd, 65536) if ready else b""
            if not chunk:
                raise AssertionError(f"qemu-io ended: {self.out.decode()}")
            self.out += chunk
        text, self.out = self.out.decode(), b""
        return text

    def run(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self.read_prompt()

    def quit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"quit\n")
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


@contextmanager
def qemu_holds(path: Path, *args: str, locked: Path | None = None) -> Iterator[QemuIo]:
    """qemu-io with *args* holding *path* until the block ends."""
    io = QemuIo([*args, str(path)])
    try:
        wait_locked(locked or path, io.proc)
        yield io
    finally:
        io.quit()


def refused_by_qemu(*argv: str) -> str:
    """Runs a QEMU tool that must fail; returns its error output."""
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode != 0, (argv, r.stdout)
    return r.stderr


def qemu_ok(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 0, (argv, r.stderr)
    return r.stdout


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.qcow2"
    qi.qemu_img("create", "-f", "qcow2", p, "64M")
    qi.qemu_io(p, "write -P 0x11 0 64k")
    return p


def assert_lock_error(
    exc: pytest.ExceptionInfo[qcow2ovl.LockError], first: str, path: Path
) -> None:
    e = exc.value
    assert isinstance(e, qcow2ovl.Qcow2Error) and isinstance(e, OSError)
    assert e.errno == 11  # EAGAIN
    assert e.filename == str(path)
    assert str(e) == f"{first}\nIs another process using the image [{path}]?", str(e)


# ---- QEMU holds the image ---------------------------------------------------------------------


@pytest.mark.parametrize("holder", ["qemu-io", "qemu-nbd"])
def test_a_qemu_writer_refuses_us_as_it_refuses_qemu(image: Path, tmp_path: Path, holder: str):
    before = qi.sha256_file(image)
    if holder == "qemu-io":
        ctx = qemu_holds(image)
    else:
        ctx = _qemu_nbd_holds(image, tmp_path / "nbd.sock")
    with ctx:
        assert locked_bytes(image) == WRITER
        # QEMU's own refusals, the oracle for ours.
        assert NOT_SHARED in refused_by_qemu("qemu-io", "-c", "quit", str(image))
        assert HELD in refused_by_qemu("qemu-img", "check", str(image))
        with pytest.raises(qcow2ovl.LockError) as exc:
            qcow2ovl.open(image, writable=True)
        assert_lock_error(exc, NOT_SHARED, image)
        with pytest.raises(qcow2ovl.LockError) as exc:
            qcow2ovl.open(image)
        assert_lock_error(exc, HELD, image)
        with pytest.raises(qcow2ovl.LockError):
            qcow2ovl.create(image, MiB, overwrite=True)
        assert qi.sha256_file(image) == before
        # The refused attempts left no lock behind.
        assert locked_bytes(image) == WRITER
        with qcow2ovl.open(image, force_share=True) as img:
            assert len(img.read(0, 4096)) == 4096
            assert locked_bytes(image) == WRITER
        with qcow2ovl.open(image, locking="off") as img:
            assert img.info.virtual_size == 64 * MiB
        with qcow2ovl.open(image, writable=True, locking="off") as img:
            assert img.writable
    assert locked_bytes(image) == []


@contextmanager
def _qemu_nbd_holds(path: Path, sock: Path) -> Iterator[None]:
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", "qcow2", "-k", str(sock), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_locked(path, proc, WRITER)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_a_qemu_reader_lets_readers_in_and_keeps_writers_out(image: Path):
    with qemu_holds(image, "-r"):
        assert locked_bytes(image) == READER
        assert NOT_SHARED in refused_by_qemu("qemu-io", "-c", "quit", str(image))
        with pytest.raises(qcow2ovl.LockError) as exc:
            qcow2ovl.open(image, writable=True)
        assert_lock_error(exc, NOT_SHARED, image)
        with qcow2ovl.open(image) as img:
            assert img.read(0, 2) == b"\x11\x11"


def test_the_data_loss_scenario_is_refused(image: Path):
    """qemu-io writes; a qcow2ovl writer used to allocate the same cluster as QEMU and lose its
    data. Now it is refused, and everything QEMU wrote is intact."""
    with qemu_holds(image) as io:
        io.run("write -P 0x22 0 64k")
        with pytest.raises(qcow2ovl.LockError):
            qcow2ovl.open(image, writable=True)
        io.run("write -P 0x33 1M 64k")
        io.run("flush")
    assert qi.check_is_clean(qi.qemu_check(image))
    qi.qemu_io(image, "read -P 0x22 0 64k", "read -P 0x33 1M 64k", "read -P 0 8M 64k")


# ---- we hold the image ------------------------------------------------------------------------


def test_our_writer_refuses_qemu_as_qemu_refuses_itself(image: Path):
    with qcow2ovl.open(image, writable=True) as img:
        img.write(8 * MiB, b"\x44" * 65536)
        img.flush()
        assert locked_bytes(image) == WRITER
        before = qi.sha256_file(image)
        assert NOT_SHARED in refused_by_qemu("qemu-io", "-c", "write 1M 64k", str(image))
        assert HELD in refused_by_qemu("qemu-img", "info", str(image))
        assert HELD in refused_by_qemu("qemu-img", "check", str(image))
        assert NOT_SHARED in refused_by_qemu("qemu-img", "create", "-f", "qcow2", str(image), "1M")
        assert "virtual size: 64 MiB" in qemu_ok("qemu-img", "info", "-U", str(image))
        assert qi.sha256_file(image) == before
        # Another handle in this process is another open file description: refused too.
        with pytest.raises(qcow2ovl.LockError) as exc:
            qcow2ovl.open(image, writable=True)
        assert_lock_error(exc, NOT_SHARED, image)
        with pytest.raises(qcow2ovl.LockError) as exc:
            qcow2ovl.open(image)
        assert_lock_error(exc, HELD, image)
        # And another qcow2ovl process.
        code = f"import qcow2ovl; qcow2ovl.open({str(image)!r}, writable=True)"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode != 0 and "LockError" in r.stderr and NOT_SHARED in r.stderr
        # The locks survive resize and snapshot operations.
        img.resize(128 * MiB)
        img.create_snapshot("s1")
        img.delete_snapshot("s1")
        assert locked_bytes(image) == WRITER
    assert locked_bytes(image) == []
    qi.qemu_io(image, "read -P 0x44 8M 64k", "write -P 0x55 1M 64k")


def test_our_reader_shares_with_readers_only(image: Path):
    with qcow2ovl.open(image) as img:
        assert img.read(0, 1) == b"\x11"
        assert locked_bytes(image) == READER
        qemu_ok("qemu-io", "-r", "-c", "read -P 0x11 0 64k", str(image))
        qemu_ok("qemu-img", "info", str(image))
        qemu_ok("qemu-img", "check", str(image))
        assert NOT_SHARED in refused_by_qemu("qemu-io", "-c", "write 0 4k", str(image))
        with qcow2ovl.open(image) as other:
            assert other.read(0, 1) == b"\x11"
    assert locked_bytes(image) == []


def test_force_share_is_read_only(image: Path):
    with pytest.raises(ValueError, match="^force-share=on can only be used with read-only images$"):
        qcow2ovl.open(image, writable=True, force_share=True)
    assert "force-share=on can only be used with read-only images" in refused_by_qemu(
        "qemu-io", "-U", "-c", "quit", str(image)
    )
    with qcow2ovl.open(image, force_share=True) as img:
        # QEMU's -U still holds "consistent read" (byte 100) and shares everything.
        assert locked_bytes(image) == [100]
        with qemu_holds(image):
            assert img.read(0, 1) == b"\x11"


def test_locking_modes(image: Path):
    with pytest.raises(ValueError, match="^invalid parameter value: maybe$"):
        qcow2ovl.open(image, locking="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid parameter value: maybe"):
        qcow2ovl.create(image.with_suffix(".new"), MiB, locking="maybe")  # type: ignore[arg-type]
    with qcow2ovl.open(image, writable=True, locking="off"):
        assert locked_bytes(image) == []
        qemu_ok("qemu-img", "info", str(image))
    with qcow2ovl.open(image, writable=True, locking="on"):
        assert locked_bytes(image) == WRITER


# ---- the same bytes as QEMU for each kind of open ---------------------------------------------


def _ours_then_qemus(path: Path, ours: dict[str, object], qemu: list[str], locked: Path) -> None:
    with qcow2ovl.open(path, **ours) as img:  # type: ignore[arg-type]
        img.read(0, 512)  # a read-only image opens its chain at the first read
        mine = locked_bytes(locked)
    with qemu_holds(path, *qemu, locked=locked):
        theirs = locked_bytes(locked)
    assert mine == theirs, (ours, qemu)


@pytest.mark.parametrize(
    ("ours", "qemu"),
    [
        ({"writable": True}, []),
        ({}, ["-r"]),
        ({"force_share": True}, ["-r", "-U"]),
    ],
    ids=["writable", "read-only", "force-share"],
)
def test_same_locks_as_qemu_on_image_backing_and_data_file(
    tmp_path: Path, ours: dict[str, object], qemu: list[str]
):
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qi.qemu_img("create", "-f", "qcow2", base, "16M")
    qi.qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    _ours_then_qemus(top, ours, qemu, top)
    _ours_then_qemus(top, ours, qemu, base)
    data = tmp_path / "data.raw"
    ext = tmp_path / "ext.qcow2"
    qi.qemu_img("create", "-f", "qcow2", "-o", f"data_file={data}", ext, "16M")
    _ours_then_qemus(ext, ours, qemu, ext)
    _ours_then_qemus(ext, ours, qemu, data)


# ---- backing chains and data files ------------------------------------------------------------


def test_backing_files_while_we_write_an_overlay(tmp_path: Path):
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qi.qemu_img("create", "-f", "qcow2", base, "16M")
    qi.qemu_io(base, "write -P 0x66 0 64k")
    qi.qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    with qcow2ovl.open(top, writable=True) as img:
        # Locked at open, before any read: the base must not change under the overlay.
        assert locked_bytes(base) == READER
        assert NOT_SHARED in refused_by_qemu("qemu-io", "-c", "write 0 4k", str(base))
        qemu_ok("qemu-io", "-r", "-c", "read -P 0x66 0 64k", str(base))
        with pytest.raises(qcow2ovl.LockError) as exc:
            qcow2ovl.open(base, writable=True)
        assert_lock_error(exc, NOT_SHARED, base)
        img.write(4096, b"\x77" * 4096)
    assert locked_bytes(base) == []
    qi.qemu_io(top, "read -P 0x66 0 4k", "read -P 0x77 4k 4k")


def test_a_base_qemu_writes_is_refused_as_qemu_refuses_it(tmp_path: Path):
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qi.qemu_img("create", "-f", "qcow2", base, "16M")
    qi.qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    before = qi.sha256_file(top)
    with qemu_holds(base):
        # QEMU refuses a writable overlay on a base another process writes: its backing file
        # is opened with the reader's set, which does not share "write".
        msg = refused_by_qemu("qemu-io", "-c", "quit", str(top))
        assert f"Could not open backing file: {HELD}" in msg
        with pytest.raises(qcow2ovl.LockError) as exc:
            qcow2ovl.open(top, writable=True)
        assert str(exc.value).startswith(f"Could not open backing file: {HELD}\n")
        assert exc.value.filename == str(base)
        with pytest.raises(qcow2ovl.LockError):
            qcow2ovl.open(base, writable=True)
        # A read-only open inspects the overlay, and is refused at the first read.
        with qcow2ovl.open(top) as img:
            assert img.info.backing_file == base.name
            with pytest.raises(qcow2ovl.LockError):
                img.read(0, 512)
        assert locked_bytes(top) == []
    assert qi.sha256_file(top) == before


def test_a_data_file_qemu_holds(tmp_path: Path):
    data = tmp_path / "data.raw"
    ext = tmp_path / "ext.qcow2"
    qi.qemu_img("create", "-f", "qcow2", "-o", f"data_file={data}", ext, "16M")
    with qcow2ovl.open(ext, writable=True):
        assert locked_bytes(data) == [100, 101, 103, 203]
        # Another writer of the image is refused by the image's own lock.
        assert NOT_SHARED in refused_by_qemu("qemu-io", "-c", "quit", str(ext))
        # Resizing the data file is what the data file's lock refuses.
        assert "resize" in refused_by_qemu("qemu-img", "resize", "-f", "raw", str(data), "32M"), (
            "qemu-img resize of the data file should be refused"
        )
    assert locked_bytes(data) == []


# ---- creation ---------------------------------------------------------------------------------


def test_create_over_a_held_file_changes_nothing(image: Path, tmp_path: Path):
    before = qi.sha256_file(image)
    with qemu_holds(image, "-r"):
        with pytest.raises(qcow2ovl.LockError) as exc:
            qcow2ovl.create(image, MiB, overwrite=True)
        assert str(exc.value).startswith(NOT_SHARED), str(exc.value)
        # qemu-img's own create is refused the same way.
        assert NOT_SHARED in refused_by_qemu("qemu-img", "create", "-f", "qcow2", str(image), "1M")
    assert qi.sha256_file(image) == before
    # A data file another image's writer holds: the image this call made is removed again,
    # the data file is untouched, as with qemu-img.
    data = tmp_path / "held.raw"
    holder = tmp_path / "holder.qcow2"
    qi.qemu_img("create", "-f", "qcow2", "-o", f"data_file={data}", holder, "1M")
    qi.qemu_io(holder, "write -P 0x99 0 4k")
    data_before = qi.sha256_file(data)
    new = tmp_path / "new.qcow2"
    with qemu_holds(holder, locked=data):
        with pytest.raises(qcow2ovl.LockError) as exc:
            qcow2ovl.create(new, MiB, data_file=str(data), overwrite=True)
        assert str(exc.value).startswith('Failed to get "resize" lock'), str(exc.value)
        assert exc.value.filename == str(data)
        msg = refused_by_qemu(
            "qemu-img", "create", "-f", "qcow2", "-o", f"data_file={data}", str(new), "1M"
        )
        assert 'Failed to get "resize" lock' in msg
    assert not new.exists()
    assert qi.sha256_file(data) == data_before
    qcow2ovl.create(image, MiB, overwrite=True)
    assert qi.qemu_info(image)["virtual-size"] == MiB


# ---- the command line -------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qcow2ovl", *args], capture_output=True, text=True)


def same_refusal(ours: list[str], theirs: list[str]) -> None:
    """Both commands fail with the same message, but for the program's name."""
    mine = cli(*ours)
    qemu = subprocess.run(theirs, capture_output=True, text=True)
    assert mine.returncode == 1 and qemu.returncode == 1, (mine.stderr, qemu.stderr)
    program = theirs[0]
    expected = qemu.stderr.replace(f"{program}: ", "qcow2ovl: ", 1)
    assert mine.stderr == expected, (mine.stderr, qemu.stderr)


def test_read_only_commands_refused_beside_a_writer_and_shared_with_u(image: Path, tmp_path: Path):
    p = str(image)
    out = str(tmp_path / "out.raw")
    with qemu_holds(image):
        same_refusal(["info", p], ["qemu-img", "info", p])
        same_refusal(["check", p], ["qemu-img", "check", p])
        same_refusal(["map", "--guest", p], ["qemu-img", "map", p])
        same_refusal(["snapshot", "-l", p], ["qemu-img", "snapshot", "-l", p])
        same_refusal(["convert", "-O", "raw", p, out], ["qemu-img", "convert", "-O", "raw", p, out])
        same_refusal(["io", "-c", "write 0 4k", p], ["qemu-io", "-c", "write 0 4k", p])
        same_refusal(["io", "-r", "-c", "read 0 4k", p], ["qemu-io", "-r", "-c", "read 0 4k", p])
        same_refusal(["snapshot", "-c", "s", p], ["qemu-img", "snapshot", "-c", "s", p])
        same_refusal(["check", "-r", "all", p], ["qemu-img", "check", "-r", "all", p])
        # Our metadata map looks at the tables only, as qemu-img info does.
        same_refusal(["map", p], ["qemu-img", "info", p])
        # -U: what qemu-img does with -U, we do.
        for args in (
            ["info", "-U", p],
            ["map", "-U", p],
            ["map", "--guest", "-U", p],
            ["snapshot", "-U", "-l", p],
            ["io", "-r", "-U", "-c", "read 0 4k", p],
            ["convert", "-U", "-O", "raw", p, out],
        ):
            r = cli(*args)
            assert r.returncode == 0, (args, r.stderr)
        r = cli("check", "-U", p)
        assert "lock" not in r.stderr, r.stderr
        # -U on a command that writes is refused, in qemu-img's and qemu-io's words.
        same_refusal(["snapshot", "-U", "-c", "s", p], ["qemu-img", "snapshot", "-U", "-c", "s", p])
        same_refusal(["check", "-U", "-r", "all", p], ["qemu-img", "check", "-U", "-r", "all", p])
        same_refusal(["io", "-U", "-c", "read 0 4k", p], ["qemu-io", "-U", "-c", "read 0 4k", p])


def test_commands_against_a_qcow2ovl_writer(image: Path):
    with qcow2ovl.open(image, writable=True):
        r = cli("info", str(image))
        assert r.returncode == 1 and HELD in r.stderr
        assert cli("info", "-U", str(image)).returncode == 0
        r = cli("io", "-c", "write 0 4k", str(image))
        assert r.returncode == 1 and NOT_SHARED in r.stderr


def test_a_forked_child_closing_its_copy_keeps_the_parents_locks(image: Path):
    with qcow2ovl.open(image, writable=True) as img:
        pid = os.fork()
        if pid == 0:  # the child: close its copy of the handle, then leave
            try:
                img.close()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert status == 0
        assert locked_bytes(image) == WRITER
        assert NOT_SHARED in refused_by_qemu("qemu-io", "-c", "quit", str(image))
    assert locked_bytes(image) == []


def test_repair_is_refused_beside_a_qemu_reader(image: Path):
    before = qi.sha256_file(image)
    with qemu_holds(image, "-r"):
        with pytest.raises(qcow2ovl.LockError) as exc:
            qcow2ovl.check(image, repair="all")
        assert_lock_error(exc, NOT_SHARED, image)
        assert NOT_SHARED in refused_by_qemu("qemu-img", "check", "-r", "all", str(image))
        # A plain check reads beside a reader.
        assert qcow2ovl.check(image).exit_code == 0
    assert qi.sha256_file(image) == before


def test_no_notice_where_ofd_locks_exist():
    from qcow2ovl import _core

    # This system has OFD locks: neither mode has anything to say (the fallback decisions and
    # their words are unit-tested in src/lock.rs).
    assert _core.locking_notice("auto") is None
    assert _core.locking_notice("on") is None
    assert _core.locking_notice("off") is None
    with pytest.raises(ValueError, match="invalid parameter value: x"):
        _core.locking_notice("x")


def test_cli_create_over_a_held_file_as_qemu_img(image: Path):
    before = qi.sha256_file(image)
    p = str(image)
    with qemu_holds(image, "-r"):
        same_refusal(
            ["create", "-f", "qcow2", p, "1M"], ["qemu-img", "create", "-f", "qcow2", p, "1M"]
        )
        mine = cli("create", "-f", "qcow2", p, "1M")
        theirs = subprocess.run(
            ["qemu-img", "create", "-f", "qcow2", p, "1M"], capture_output=True, text=True
        )
        assert mine.stdout == theirs.stdout  # the "Formatting ..." line, printed first by both
    assert qi.sha256_file(image) == before


def test_a_real_file_object_is_locked_as_its_path(image: Path):
    # A file object with a real descriptor is read through a duplicate of it: same open file
    # description, same locks as opening the path.
    with open(image, "r+b") as f:
        with qemu_holds(image):
            with pytest.raises(qcow2ovl.LockError):
                qcow2ovl.open(f, writable=True)
        with qcow2ovl.open(f, writable=True) as img:
            img.write(0, b"\x12" * 512)
            assert locked_bytes(image) == WRITER
            assert NOT_SHARED in refused_by_qemu("qemu-io", "-c", "write 0 4k", str(image))
    assert locked_bytes(image) == []
    qi.qemu_io(image, "read -P 0x12 0 512")
