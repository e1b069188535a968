"""Encrypted images (LUKS, and legacy AES for reading), with QEMU as the oracle.

- Images qemu-img makes with each cipher it writes (AES-128/192/256 in XTS and CBC; IVs plain,
  plain64 and ESSIV; header hashes sha1/sha256/sha512) and clusters of 512 bytes, 64 KiB and
  extended L2: our whole-disk read equals ``qemu-img convert`` with the secret.
- Our writes, zeroes and discards (unaligned ones too, copy-on-write from snapshots and backing
  files) read back through ``qemu-img convert`` as a plain mirror does; ``qemu-img check`` is
  clean; no plaintext of what we wrote is in the file.
- Images we create open in QEMU with each cipher, both ways round.
- Secrets: a wrong one is refused in QEMU's words with nothing changed, a missing one leaves
  metadata readable and guest data refused, and no secret shows in a message or ``repr``.
- Legacy AES images read with a warning and are never written.

The command line's handling of encrypted images is in ``test_encryption_cli.py``.
"""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import pytest
import qcow2ovl
import qemu_images as qi
from luks_images import (
    CIPHER_IDS,
    CIPHERS,
    IMAGE_KEYS,
    SECRET,
    SIZE,
    KiB,
    MiB,
    build_images,
    luks_opts,
    our_disk,
    qemu_raw,
)

pytestmark = pytest.mark.skipif(not qi.HAVE_QEMU, reason="needs qemu-img and qemu-io")


@pytest.fixture(scope="module")
def made(module_tmp_path: Path) -> dict[str, qi.ImageRef]:
    """The images of `luks_images.IMAGE_KEYS`, made by QEMU."""
    return build_images(module_tmp_path)


@pytest.mark.parametrize("key", IMAGE_KEYS)
def test_whole_disk_read_equals_qemu(
    key: str, made: dict[str, qi.ImageRef], tmp_path: Path
) -> None:
    ref = made[key]
    assert our_disk(ref.path) == qemu_raw(ref, tmp_path / "want.raw")


def _workload(img: qcow2ovl.Image, mirror: bytearray, seed: int) -> None:
    """Unaligned writes and zeroes, discards of whole clusters, a snapshot midway; mirrored."""
    rng = random.Random(seed)
    size = len(mirror)
    for step in range(120):
        off = rng.randrange(0, size - 1)
        length = min(rng.randrange(1, 200 * KiB), size - off)
        op = rng.randrange(10)
        if op == 0:
            img.write_zeroes(off, length)
            mirror[off : off + length] = bytes(length)
        elif op == 1:
            # A discard zeroes whole clusters only (partial ones are left alone, as QEMU does).
            cs = img.info.cluster_size
            off, length = off // cs * cs, max(cs, length // cs * cs)
            length = min(length, size - off)
            img.discard(off, length)
            mirror[off : off + length] = bytes(length)
        elif op == 2 and step > 60 and not img.snapshots:
            img.create_snapshot("mid")
        else:
            data = bytes([rng.randrange(1, 256)]) * length
            img.write(off, data)
            mirror[off : off + length] = data


@pytest.mark.parametrize("key", IMAGE_KEYS)
def test_our_writes_read_back_in_qemu(
    key: str, made: dict[str, qi.ImageRef], tmp_path: Path
) -> None:
    src = made[key]
    path = tmp_path / "w.qcow2"
    shutil.copyfile(src.path, path)
    ref = qi.ImageRef(path, secret=True)
    mirror = bytearray(qemu_raw(ref, tmp_path / "before.raw"))
    with qcow2ovl.open(path, writable=True, secret=SECRET) as img:
        _workload(img, mirror, seed=IMAGE_KEYS.index(key))
    assert qemu_raw(ref, tmp_path / "after.raw") == bytes(mirror)
    assert qi.check_is_clean(qi.qemu_check(ref))
    # qemu-img check needs the secret; ours does not.
    assert qcow2ovl.check(path).exit_code == 0


def test_no_plaintext_reaches_the_file(made: dict[str, qi.ImageRef], tmp_path: Path) -> None:
    path = tmp_path / "p.qcow2"
    shutil.copyfile(made[IMAGE_KEYS[0]].path, path)
    marker = b"qcow2ovl-plaintext-marker-"
    data = marker * (300 * KiB // len(marker))
    with qcow2ovl.open(path, writable=True, secret=SECRET) as img:
        img.write(12345, data)
        img.write(3 * MiB, data[:1000])
    raw = path.read_bytes()
    assert marker not in raw
    with qcow2ovl.open(path, secret=SECRET) as img:
        assert img.read(12345, len(data)) == data


def test_compressed_clusters_written_by_qemu_read_back(made: dict[str, qi.ImageRef]) -> None:
    """qemu-io's `write -c` stores a compressed cluster, which QEMU does not encrypt: it reads
    back as plaintext."""
    ref = made[IMAGE_KEYS[0]]
    (first, *_) = qi.qemu_map(ref)
    assert first["compressed"] and first["start"] == 0, first
    with qcow2ovl.open(ref.path, secret=SECRET) as img:
        assert img.read(0, 64 * KiB) == b"\x77" * (64 * KiB)


def test_compressed_writes_are_refused(made: dict[str, qi.ImageRef], tmp_path: Path) -> None:
    path = tmp_path / "c.qcow2"
    shutil.copyfile(made[IMAGE_KEYS[0]].path, path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with qcow2ovl.open(path, writable=True, secret=SECRET) as img:
        with pytest.raises(qcow2ovl.EncryptionError, match="stored unencrypted"):
            img.write_compressed(0, b"\x01" * (64 * KiB))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_copy_on_write_from_a_plain_backing_file(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qi.create(base, SIZE)
    qi.qemu_io(base, "write -P 0x11 0 8M")
    top = tmp_path / "top.qcow2"
    qi.qemu_img(
        "create", "-q", "-f", "qcow2", "--object", qi.SECRET_OBJECT,
        "-o", f"encrypt.format=luks,encrypt.key-secret={qi.SECRET_ID},encrypt.iter-time=10",
        "-b", str(base), "-F", "qcow2", str(top),
    )  # fmt: skip
    mirror = bytearray(b"\x11" * SIZE)
    with qcow2ovl.open(top, writable=True, secret=SECRET) as img:
        for off, n, b in ((1000, 3000, 0x22), (70000, 1, 0x33), (5 * MiB + 7, 200 * KiB, 0x44)):
            img.write(off, bytes([b]) * n)
            mirror[off : off + n] = bytes([b]) * n
    assert qemu_raw(qi.ImageRef(top, secret=True), tmp_path / "t.raw") == bytes(mirror)
    assert our_disk(top) == bytes(mirror)


def test_a_write_onto_the_luks_area_is_refused(tmp_path: Path) -> None:
    """An L2 entry pointing guest data at the LUKS header area: the write is refused before a
    byte (ciphered or not) reaches the area, and the image is marked corrupt."""
    path = tmp_path / "g.qcow2"
    ref = qi.create(path, SIZE, opts=luks_opts(CIPHERS[0]), secret=True)
    qi.qemu_io(ref, "write -P 0x2a 0 64k")
    (l1,) = qi.peek(path, 40, ">Q")
    (l1_entry,) = qi.peek(path, l1, ">Q")
    with qcow2ovl.open(path) as img:
        assert img.info.crypto_header is not None
        area, area_len = img.info.crypto_header
    qi.poke(path, l1_entry & 0x00FFFFFFFFFFFE00, ">Q", (1 << 63) | area)
    before = path.read_bytes()
    with qcow2ovl.open(path, writable=True, secret=SECRET) as img:
        with pytest.raises(qcow2ovl.MetadataOverlapError, match="encryption header"):
            img.write(0, b"\xff" * 512)
    after = path.read_bytes()
    assert after[area : area + area_len] == before[area : area + area_len]
    with qcow2ovl.open(path) as img:
        assert img.info.corrupt


# ---- images we create ---------------------------------------------------------------------------


@pytest.mark.parametrize("cipher", CIPHERS, ids=CIPHER_IDS)
def test_created_images_open_in_qemu(
    cipher: tuple[str, str, str, str | None, str], tmp_path: Path
) -> None:
    alg, mode, ivgen, ivhash, hashalg = cipher
    path = tmp_path / "new.qcow2"
    encrypt: dict[str, object] = {
        "format": "luks",
        "key_secret": SECRET,
        "cipher_alg": alg,
        "cipher_mode": mode,
        "ivgen_alg": ivgen,
        "hash_alg": hashalg,
        "iter_time": 10,
    }
    if ivhash is not None:
        encrypt["ivgen_hash_alg"] = ivhash
    qcow2ovl.create(path, SIZE, encrypt=encrypt)
    info = qi.qemu_info(path)["format-specific"]["data"]["encrypt"]
    assert (info["cipher-alg"], info["cipher-mode"], info["ivgen-alg"], info["hash-alg"]) == (
        alg, mode, ivgen, hashalg,
    )  # fmt: skip
    assert info.get("ivgen-hash-alg") == ivhash
    ref = qi.ImageRef(path, secret=True)
    assert qi.check_is_clean(qi.qemu_check(ref))
    # QEMU writes, we read; we write, QEMU reads.
    qi.qemu_io(ref, "write -P 0x5a 4096 100k")
    with qcow2ovl.open(path, writable=True, secret=SECRET) as img:
        assert img.read(4096, 100 * KiB) == b"\x5a" * (100 * KiB)
        img.write(1 * MiB + 3, b"\xa5" * 5000)
    qi.qemu_io(ref, "read -P 0xa5 1048579 5000", "read -P 0x5a 4096 100k")
    assert qi.check_is_clean(qi.qemu_check(ref))


def test_created_layout_matches_qemu(tmp_path: Path) -> None:
    """The LUKS area where qemu-img puts it: after the L1 table (or the preallocated data), its
    length QEMU's, the file ending at its last cluster."""
    for prealloc in ("off", "metadata"):
        ours, theirs = tmp_path / f"o-{prealloc}.qcow2", tmp_path / f"t-{prealloc}.qcow2"
        qcow2ovl.create(
            ours, SIZE, preallocation=prealloc,
            encrypt={"format": "luks", "key_secret": SECRET, "iter_time": 10},
        )  # fmt: skip
        qi.create(
            theirs, SIZE, secret=True,
            opts={"encrypt.format": "luks", "encrypt.key-secret": qi.SECRET_ID,
                  "encrypt.iter-time": 10, "preallocation": prealloc},
        )  # fmt: skip
        assert ours.stat().st_size == theirs.stat().st_size
        with qcow2ovl.open(ours) as a, qcow2ovl.open(theirs) as b:
            assert a.info.crypto_header == b.info.crypto_header


# ---- secrets ------------------------------------------------------------------------------------


def test_wrong_secret_is_refused_and_nothing_changes(
    made: dict[str, qi.ImageRef], tmp_path: Path
) -> None:
    path = tmp_path / "s.qcow2"
    shutil.copyfile(made[IMAGE_KEYS[0]].path, path)
    before = path.read_bytes()
    for wrong in ("12345", b"1234567", "", "secret-" * 100):
        for writable in (False, True):
            with pytest.raises(qcow2ovl.EncryptionError) as err:
                qcow2ovl.open(path, writable=writable, secret=wrong)
            assert "Invalid password, cannot unlock any keyslot" in str(err.value)
            text = wrong if isinstance(wrong, str) else wrong.decode()
            if text:
                assert text not in str(err.value)
    assert path.read_bytes() == before


def test_secret_as_str_or_bytes(made: dict[str, qi.ImageRef]) -> None:
    p = made[IMAGE_KEYS[0]].path
    assert our_disk(p, SECRET) == our_disk(p, SECRET.encode())
    with pytest.raises(TypeError, match="secret must be str or bytes"):
        qcow2ovl.open(p, secret=123456)  # type: ignore[arg-type]


def test_without_a_secret_metadata_works_and_data_is_refused(
    made: dict[str, qi.ImageRef], tmp_path: Path
) -> None:
    path = tmp_path / "m.qcow2"
    shutil.copyfile(made[IMAGE_KEYS[0]].path, path)
    with qcow2ovl.open(path, writable=True) as img:
        assert img.info.encrypted
        img.create_snapshot("meta-only")  # metadata: no secret needed
        with pytest.raises(qcow2ovl.EncryptionError, match="needs its secret"):
            img.read(0, 512)
        with pytest.raises(qcow2ovl.EncryptionError, match="needs its secret"):
            img.write(0, b"x" * 512)
        assert SECRET not in repr(img)
    assert qcow2ovl.check(path).exit_code == 0
    qi.qemu_img("snapshot", "-l", "--object", qi.SECRET_OBJECT, "--image-opts",
                qi.ImageRef(path, secret=True).image_opts())  # fmt: skip


# ---- legacy AES ---------------------------------------------------------------------------------


def test_legacy_aes_reads_and_is_never_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "aes.qcow2"
    ref = qi.create(
        path, SIZE, opts={"encrypt.format": "aes", "encrypt.key-secret": qi.SECRET_ID}, secret=True
    )
    qi.qemu_io(ref, "write -P 0x3c 1000 70000", "write -P 0x4d 3M 64k")
    with caplog.at_level("WARNING", logger="qcow2ovl"):
        assert our_disk(path) == qemu_raw(ref, tmp_path / "aes.raw")
    assert "legacy AES encryption is insecure" in caplog.text
    before = path.read_bytes()
    with qcow2ovl.open(path, writable=True, secret=SECRET) as img:
        with pytest.raises(qcow2ovl.EncryptionError, match="legacy AES"):
            img.write(0, b"\x01" * 512)
    assert path.read_bytes() == before
