"""``qcow2ovl.open(fileobj)``: real files through their descriptor, other objects (``BytesIO``,
archive members) through their methods; QEMU reads what was written."""

from __future__ import annotations

import io
import os
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
import qcow2ovl
import qemu_images as qi

needs_qemu = pytest.mark.skipif(not qi.HAVE_QEMU, reason="qemu-img/qemu-io not installed")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A qcow2ovl image with known data at 0 and 3 MiB."""
    path = tmp_path / "disk.qcow2"
    qcow2ovl.create(path, 16 << 20)
    with qcow2ovl.open(path, writable=True) as img:
        img.write(0, b"\x11" * 65536)
        img.write(3 << 20, b"\x22" * 4096)
    return path


def _same_view(a: qcow2ovl.Image, b: qcow2ovl.Image) -> None:
    assert a.info == b.info
    assert list(a.metadata_extents()) == list(b.metadata_extents())
    assert a.read(0, a.virtual_size) == b.read(0, b.virtual_size)


def test_a_real_file_reads_like_its_path(image: Path) -> None:
    with open(image, "rb") as f, qcow2ovl.open(f) as img, qcow2ovl.open(image) as ref:
        assert img.path == str(image)
        assert not img.writable
        _same_view(img, ref)
        # The object's cursor is not used (positioned reads on a duplicate descriptor).
        assert f.tell() == 0
    with open(image, "rb", buffering=0) as raw, qcow2ovl.open(raw) as img:
        assert img.read(3 << 20, 4096) == b"\x22" * 4096


def test_objects_without_a_descriptor_are_read_through_their_methods(image: Path) -> None:
    data = image.read_bytes()
    with qcow2ovl.open(io.BytesIO(data)) as img, qcow2ovl.open(image) as ref:
        assert img.path.startswith("<_io.BytesIO")
        _same_view(img, ref)
        guest = img.stream().read()
        assert guest[:65536] == b"\x11" * 65536


def test_images_inside_archives(image: Path, tmp_path: Path) -> None:
    zpath = tmp_path / "a.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.write(image, "inner/disk.qcow2")
    tpath = tmp_path / "a.tar"
    with tarfile.open(tpath, "w") as t:
        t.add(image, "inner/disk.qcow2")
    with qcow2ovl.open(image) as ref:
        expected = ref.read(0, ref.virtual_size)
    with zipfile.ZipFile(zpath) as z, z.open("inner/disk.qcow2") as member:
        with qcow2ovl.open(member) as img:
            assert img.read(0, img.virtual_size) == expected
    with tarfile.open(tpath) as t:
        member = t.extractfile("inner/disk.qcow2")
        assert member is not None
        with qcow2ovl.open(member) as img:
            assert img.read(0, img.virtual_size) == expected


@needs_qemu
def test_writing_through_a_real_file(image: Path) -> None:
    with open(image, "r+b") as f:
        with qcow2ovl.open(f, writable=True) as img:
            img.write(5 << 20, b"\x33" * 65536)
            img.create_snapshot("s")
    qi.qemu_io(image, "read -P 0x33 5M 64k", "read -P 0x11 0 64k")
    assert qi.check_is_clean(qi.qemu_check(image))
    assert [s["name"] for s in qi.qemu_info(image)["snapshots"]] == ["s"]


@needs_qemu
def test_writing_through_a_bytes_io(image: Path, tmp_path: Path) -> None:
    buf = io.BytesIO(image.read_bytes())
    with qcow2ovl.open(buf, writable=True) as img:
        img.write(7 << 20, b"\x44" * 100_000)  # new clusters: the object grows
        img.resize(32 << 20)
        img.write(20 << 20, b"\x45" * 512)
    out = tmp_path / "out.qcow2"
    out.write_bytes(buf.getvalue())
    qi.qemu_io(out, "read -P 0x44 7M 100000", "read -P 0x45 20M 512", "read -P 0x11 0 64k")
    assert qi.check_is_clean(qi.qemu_check(out))
    assert qi.qemu_info(out)["virtual-size"] == 32 << 20


def test_read_only_unless_writable_and_asked(image: Path) -> None:
    with open(image, "rb") as f:
        with pytest.raises(ValueError, match="open for writing"):
            qcow2ovl.open(f, writable=True)
        with qcow2ovl.open(f) as img, pytest.raises(qcow2ovl.ReadOnlyImageError) as e:
            img.write(0, b"x")
        assert e.value.filename == str(image)
    with open(image, "r+b") as f, qcow2ovl.open(f) as img:
        assert not img.writable
    with open(image, "ab") as f:
        with pytest.raises(ValueError, match="open for writing|append"):
            qcow2ovl.open(f, writable=True)
    ro = io.BytesIO(image.read_bytes())
    with qcow2ovl.open(ro) as img:
        with pytest.raises(qcow2ovl.ReadOnlyImageError):
            img.discard(0, 65536)
    assert ro.getvalue() == image.read_bytes()


def test_append_mode_descriptors_are_refused_for_writing(image: Path) -> None:
    fd = os.open(image, os.O_RDWR | os.O_APPEND)
    with os.fdopen(fd, "r+b") as f:
        with pytest.raises(ValueError, match="append mode"):
            qcow2ovl.open(f, writable=True)


def test_unusable_objects_are_refused(image: Path) -> None:
    with pytest.raises(TypeError, match="seekable binary file object"):
        qcow2ovl.open(42)  # type: ignore[arg-type]
    closed = io.BytesIO(b"")
    closed.close()
    with pytest.raises(ValueError, match="closed file"):
        qcow2ovl.open(closed)

    class Pipe(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

    with pytest.raises(ValueError, match="not seekable"):
        qcow2ovl.open(Pipe())
    with pytest.raises(qcow2ovl.FormatError, match="empty"):
        qcow2ovl.open(io.BytesIO(b""))
    with pytest.raises(TypeError, match="binary file object"):
        qcow2ovl.open(io.StringIO("QFI"))  # type: ignore[arg-type]


def test_errors_of_the_object_keep_their_errno(image: Path) -> None:
    data = image.read_bytes()

    class Failing(io.BytesIO):
        fail = False

        def write(self, b: object) -> int:
            if self.fail:
                raise OSError(28, "No space left on device")
            return super().write(b)  # type: ignore[arg-type]

    f = Failing(data)
    img = qcow2ovl.open(f, writable=True, cache_size=1 << 20)
    f.fail = True
    with pytest.raises(OSError) as e:
        img.write(9 << 20, b"\x55" * 65536)
    assert e.value.errno == 28
    assert e.value.filename == img.path
    f.fail = False
    img.write(9 << 20, b"\x55" * 65536)
    img.close()
    with qcow2ovl.open(io.BytesIO(f.getvalue())) as again:
        assert again.read(9 << 20, 65536) == b"\x55" * 65536


def test_threads_share_one_object(image: Path) -> None:
    with qcow2ovl.open(io.BytesIO(image.read_bytes()), cache_size=65536) as img:
        errors: list[BaseException] = []

        def reader(off: int, byte: int, n: int) -> None:
            try:
                for _ in range(50):
                    assert img.read(off, n) == bytes([byte]) * n
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [
            threading.Thread(target=reader, args=(0, 0x11, 65536)),
            threading.Thread(target=reader, args=(3 << 20, 0x22, 4096)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []


def test_backing_files_resolve_against_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "base.qcow2"
    qcow2ovl.create(base, 1 << 20)
    with qcow2ovl.open(base, writable=True) as img:
        img.write(0, b"\x66" * 512)
    top = tmp_path / "top.qcow2"
    qcow2ovl.create(top, 1 << 20, backing_file="base.qcow2", backing_format="qcow2")
    data = top.read_bytes()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with qcow2ovl.open(io.BytesIO(data)) as img, pytest.raises(FileNotFoundError):
        img.read(0, 512)
    monkeypatch.chdir(tmp_path)
    with qcow2ovl.open(io.BytesIO(data)) as img:
        assert img.read(0, 512) == b"\x66" * 512
