"""The guard behind `qcow2ovl serve`: an image whose L2 entry points guest data at metadata
(iotest 060's scenario), served writable. A client's write there is answered EIO with the
engine's message; not one metadata byte changes (only the corrupt bit is set, as QEMU sets it);
reads go on; the server stays up for the next client; and `qcow2ovl.serve()` stops cleanly."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import qcow2ovl
import qemu_images as qi

pytestmark = pytest.mark.skipif(not qi.env_has_qemu(), reason="needs qemu-img and qemu-io")


def _point_cluster_0_at(path: Path, target: str) -> int:
    """Makes guest cluster 0 of a fresh 64 MiB image claim to live on *target* (COPIED, so a
    write goes in place); returns that host offset."""
    qi.qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qi.qemu_io(path, "write -P 0x2a 0 64k", "write -P 0x3b 1M 64k")
    (cluster_bits,) = qi.peek(path, 20, ">I")
    (l1,) = qi.peek(path, 40, ">Q")
    (reftable,) = qi.peek(path, 48, ">Q")
    (l1_entry,) = qi.peek(path, l1, ">Q")
    l2 = l1_entry & 0x00FFFFFFFFFFFE00
    where = {"l1": l1, "reftable": reftable}[target]
    assert cluster_bits == 16
    qi.poke(path, l2, ">Q", (1 << 63) | where)
    return int(where)


def _qemu_io(uri: str, *commands: str) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    return subprocess.run([*args, uri], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("target", "name"), [("l1", "active L1 table"), ("reftable", "refcount table")]
)
def test_a_write_onto_metadata_is_refused_over_nbd(
    tmp_path: Path, target: str, name: str, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.qcow2"
    _point_cluster_0_at(path, target)
    before = path.read_bytes()
    with qcow2ovl.serve(path, socket=tmp_path / "s.sock") as uri:
        refused = _qemu_io(uri, "write -P 0xff 0 512")
        assert "Input/output error" in refused.stdout + refused.stderr, refused
        # The server is still there, and reads go on.
        read = _qemu_io(uri, "read -P 0x3b 1M 64k")
        assert "read 65536/65536 bytes" in read.stdout, read
        # Later writes are refused too: the engine marked the image corrupt.
        later = _qemu_io(uri, "write -P 0x11 2M 4k")
        assert "Input/output error" in later.stdout + later.stderr, later
    after = path.read_bytes()
    (incompat,) = qi.peek(path, 72, ">Q")
    assert incompat & 2, "marked corrupt"
    assert after[:72] == before[:72] and after[80:] == before[80:]
    # The server logged the refusal once, naming what the write would have hit.
    logged = [line for line in capfd.readouterr().err.splitlines() if "request refused" in line]
    assert len(logged) == 1 and f"overlaps with {name}" in logged[0], logged


def test_an_image_in_use_cannot_be_served(tmp_path: Path) -> None:
    """Serving takes the image's write lock: a second server (or any writer) is refused."""
    path = tmp_path / "a.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", path, "16M")
    with qcow2ovl.serve(path, socket=tmp_path / "a.sock"):
        with pytest.raises(qcow2ovl.LockError), qcow2ovl.serve(path, socket=tmp_path / "b.sock"):
            pass
        proc = subprocess.run(
            ["qemu-io", "-c", "write 0 512", str(path)], capture_output=True, text=True, check=False
        )
        assert 'Failed to get "write" lock' in proc.stderr, proc
    # Released when the block ends.
    with qcow2ovl.open(path, writable=True):
        pass


def test_a_stale_socket_is_replaced_and_other_files_are_kept(tmp_path: Path) -> None:
    """A socket left behind by an earlier server is replaced (as qemu-nbd replaces it); a
    regular file at that path is refused with the bind error and left as it was."""
    import socket

    path = tmp_path / "a.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", path, "16M")
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    with qcow2ovl.serve(path, socket=stale) as uri:
        assert "read 512/512 bytes" in _qemu_io(uri, "read 0 512").stdout
    kept = tmp_path / "notes.txt"
    kept.write_text("mine")
    with pytest.raises(OSError, match="Address already in use"), qcow2ovl.serve(path, socket=kept):
        pass
    assert kept.read_text() == "mine"
