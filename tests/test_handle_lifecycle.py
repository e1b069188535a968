"""A handle's life: durability when nobody closes it, failed flushes and their retry, read-only
handles, missing snapshots, truncated files, closed handles, and what the logger hears.

QEMU (`qemu-io`, `qemu-img check`) judges what is on disk.
"""

from __future__ import annotations

import errno
import gc
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import qcow2ovl
import qemu_images as qi

needs_qemu = pytest.mark.skipif(not qi.HAVE_QEMU, reason="qemu-img/qemu-io not installed")


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _new(path: Path, size: int = 64 << 20) -> Path:
    qcow2ovl.create(path, size)
    return path


# ---- 1. unclosed writable images are flushed, with a ResourceWarning -------------------------


@needs_qemu
def test_an_image_left_open_at_exit_is_flushed(tmp_path: Path) -> None:
    path = _new(tmp_path / "exit.qcow2")
    proc = _python(
        """
        import sys, qcow2ovl
        img = qcow2ovl.open(sys.argv[1], writable=True)
        img.write(0, b"\\x77" * 65536)
        """,
        str(path),
    )
    assert proc.returncode == 0, proc.stderr
    assert "ResourceWarning: unclosed image" in proc.stderr
    assert "interpreter exit" in proc.stderr
    qi.qemu_io(path, "read -P 0x77 0 64k")
    assert qi.check_is_clean(qi.qemu_check(path))


@needs_qemu
def test_an_image_collected_while_open_is_flushed(tmp_path: Path) -> None:
    path = _new(tmp_path / "gc.qcow2")

    def scribble() -> None:
        img = qcow2ovl.open(path, writable=True)
        img.write(0, b"\x77" * 65536)
        img.write(5 << 20, b"\x78" * 4096)

    with pytest.warns(ResourceWarning, match="unclosed image .*collected"):
        scribble()
        gc.collect()
    qi.qemu_io(path, "read -P 0x77 0 64k", "read -P 0x78 5M 4k")
    assert qi.check_is_clean(qi.qemu_check(path))


def test_closed_and_read_only_images_do_not_warn(tmp_path: Path) -> None:
    path = _new(tmp_path / "quiet.qcow2")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        with qcow2ovl.open(path, writable=True) as img:
            img.write(0, b"x")
        del img
        ro = qcow2ovl.open(path)
        del ro
        gc.collect()


# ---- 2. a failed write or flush, and its retry ----------------------------------------------


@needs_qemu
def test_a_full_disk_keeps_the_handle_retryable(tmp_path: Path) -> None:
    """RLIMIT_FSIZE in a child process makes every write past the limit fail with EFBIG, as a
    full disk fails with ENOSPC. The write that crosses it fails naming the file; close()
    fails too but keeps the handle; once the limit is lifted, close() puts every write that had
    succeeded on disk."""
    path = _new(tmp_path / "full.qcow2", 2 << 30)
    proc = _python(
        """
        import errno, os, resource, signal, sys, qcow2ovl
        path = sys.argv[1]
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        def eight_writes(img):
            for k in range(8):
                img.write(k << 20, bytes([0x40 + k]) * 65536)

        # How large eight writes and their flush make the file, on a copy.
        probe = path + ".probe"
        with open(path, "rb") as src, open(probe, "wb") as dst:
            dst.write(src.read())
        with qcow2ovl.open(probe, writable=True) as img:
            eight_writes(img)
        # Room for exactly that: the eight writes and their tables fit, nothing more.
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(probe), hard))
        img = qcow2ovl.open(path, writable=True)
        eight_writes(img)
        # A new L2 range: its table goes past the limit (written only at the next flush), its
        # data too, and the data write fails.
        try:
            img.write(1 << 30, b"\\x99" * (2 << 20))
        except OSError as e:
            assert e.errno == errno.EFBIG, e
            assert e.filename == path, e.filename
            print("write failed:", e)
        else:
            raise AssertionError("the write past the limit succeeded")
        try:
            img.close()
        except OSError as e:
            assert e.errno == errno.EFBIG, e
            assert "still open" in str(e), e
            print("close failed:", e)
        assert not img.closed
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        img.close()
        assert img.closed
        """,
        str(path),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "write failed" in proc.stdout
    assert "close failed" in proc.stdout
    assert "ResourceWarning" not in proc.stderr
    qi.qemu_io(path, *(f"read -P {0x40 + k:#x} {k}M 64k" for k in range(8)))
    report = qi.qemu_check(path)
    assert report.get("corruptions", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report


def test_a_handle_whose_last_flush_fails_says_what_was_lost(tmp_path: Path) -> None:
    path = _new(tmp_path / "lost.qcow2")
    proc = _python(
        """
        import os, resource, signal, sys, qcow2ovl
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        img = qcow2ovl.open(sys.argv[1], writable=True)
        img.flush()
        size = os.path.getsize(sys.argv[1])
        img.write(0, b"\\x55" * 65536)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
        del img
        """,
        str(path),
    )
    assert proc.returncode == 0, proc.stderr
    assert "ResourceWarning: unclosed image" in proc.stderr
    assert "changes not yet on disk are lost" in proc.stderr


# ---- 3. read-only handles -------------------------------------------------------------------


def test_write_side_methods_on_a_read_only_handle_say_so(tmp_path: Path) -> None:
    path = _new(tmp_path / "ro.qcow2")
    with qcow2ovl.open(path, writable=True) as img:
        img.create_snapshot("s")
    before = path.read_bytes()
    with qcow2ovl.open(path) as img:
        calls = {
            "write": lambda: img.write(0, b"x"),
            "write_compressed": lambda: img.write_compressed(0, bytes(65536)),
            "write_zeroes": lambda: img.write_zeroes(0, 65536),
            "discard": lambda: img.discard(0, 65536),
            "resize": lambda: img.resize(128 << 20),
            "create_snapshot": lambda: img.create_snapshot("t"),
            "delete_snapshot": lambda: img.delete_snapshot("s"),
            "apply_snapshot": lambda: img.apply_snapshot("s"),
        }
        for name, call in calls.items():
            with pytest.raises(qcow2ovl.ReadOnlyImageError) as info:
                call()
            e = info.value
            assert isinstance(e, OSError) and isinstance(e, qcow2ovl.Qcow2Error)
            assert e.errno == errno.EBADF
            assert e.filename == str(path)
            assert e.strerror == (
                f"Block node is read-only: {name}() needs an image opened with writable=True"
            )
        img.flush()  # nothing to write: not an error
    assert path.read_bytes() == before


# ---- 4. missing snapshots -------------------------------------------------------------------


def test_a_missing_snapshot_is_not_a_missing_file(tmp_path: Path) -> None:
    path = _new(tmp_path / "snap.qcow2")
    with pytest.raises(qcow2ovl.SnapshotNotFoundError, match="Can't find snapshot 'nope'") as e:
        qcow2ovl.open(path, snapshot="nope")
    assert isinstance(e.value, LookupError) and isinstance(e.value, qcow2ovl.Qcow2Error)
    assert not isinstance(e.value, OSError)
    with qcow2ovl.open(path, writable=True) as img:
        for op in (img.delete_snapshot, img.apply_snapshot):
            with pytest.raises(qcow2ovl.SnapshotNotFoundError):
                op("nope")
    assert qcow2ovl.errors.SnapshotNotFoundError is qcow2ovl.SnapshotNotFoundError


# ---- 5. truncated headers -------------------------------------------------------------------


@pytest.mark.parametrize(("length", "version", "needed"), [(100, 3, 104), (50, 2, 72)])
def test_a_file_cut_inside_its_header_is_called_truncated(
    tmp_path: Path, length: int, version: int, needed: int
) -> None:
    full = _new(tmp_path / "full.qcow2", 1 << 20)
    if version == 2:
        full.unlink()
        qcow2ovl.create(full, 1 << 20, version=2)
    cut = tmp_path / "cut.qcow2"
    cut.write_bytes(full.read_bytes()[:length])
    with pytest.raises(qcow2ovl.FormatError) as e:
        qcow2ovl.open(cut)
    text = str(e.value)
    assert text.startswith(f"{cut}: qcow2 header too short")  # QEMU's words first
    assert f"the file is truncated ({length} bytes; a version {version} header needs at " in text
    assert f"least {needed})" in text


# ---- 6. closed handles ----------------------------------------------------------------------


def test_with_on_a_closed_image_is_an_error(tmp_path: Path) -> None:
    img = qcow2ovl.open(_new(tmp_path / "c.qcow2"))
    img.close()
    with pytest.raises(ValueError, match="closed image"):
        with img:
            pass


# ---- 13. logging ----------------------------------------------------------------------------


@needs_qemu
def test_repair_at_open_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A writer using lazy refcounts killed: the dirty bit stays set.
    ref = qi.create(tmp_path / "dirty.qcow2", 64 << 20, opts={"lazy_refcounts": True})
    qi.qemu_io(ref, "write -P 0x71 0 64k", "abort", ok=(0, -6, 134))
    dirty = ref.path
    with caplog.at_level(logging.DEBUG, logger="qcow2ovl"):
        with qcow2ovl.open(dirty, writable=True):
            pass
    records = [r for r in caplog.records if r.name == "qcow2ovl"]
    assert [r.levelno for r in records] == [logging.WARNING], records
    assert str(dirty) in records[0].getMessage()
    assert "repaired at open" in records[0].getMessage()
    qi.qemu_io(dirty, "read -P 0x71 0 64k")


def test_dropped_autoclear_bits_are_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _new(tmp_path / "ac.qcow2")
    qi.poke(path, 88, ">Q", 1 << 40)  # an unknown autoclear bit
    with caplog.at_level(logging.DEBUG, logger="qcow2ovl"):
        with qcow2ovl.open(path, writable=True) as img:
            assert not caplog.records  # opening writes nothing
            img.write(0, b"x")
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("autoclear feature bits 0x10000000000" in m for m in messages), messages
    assert qi.peek(path, 88, ">Q") == (0,)


def test_snapshot_operations_and_the_naive_fallback_are_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _new(tmp_path / "log.qcow2")
    with caplog.at_level(logging.DEBUG, logger="qcow2ovl"):
        with qcow2ovl.open(path, writable=True) as img:
            img.write(0, b"a" * 65536)
            img.create_snapshot("one")
            img.apply_snapshot("one")
            img.delete_snapshot("one")
        # Room for the map itself and nothing more (the refusal of a smaller limit names that
        # size): every range goes to the naive checker.
        with pytest.raises(ValueError, match="below the map's minimum of") as small:
            qcow2ovl.open(path, map_memory_limit=1)
        fixed = int(str(small.value).rsplit(" of ", 1)[1].split()[0])
        with qcow2ovl.open(path, map_memory_limit=fixed):
            pass
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert [m.split(": ", 1)[1].split(" snapshot")[0] for m in infos[:3]] == [
        "created",
        "applied",
        "deleted",
    ], infos
    assert all(m.startswith(f"{path}: ") for m in infos)
    assert "naive algorithm" in infos[3], infos
