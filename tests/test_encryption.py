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
"""

from __future__ import annotations

import base64
import hashlib
import random
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import qcow2ovl
import qemu_images as qi

pytestmark = pytest.mark.skipif(not qi.HAVE_QEMU, reason="needs qemu-img and qemu-io")

KiB = 1024
MiB = 1024 * KiB
SIZE = 8 * MiB
SECRET = qi.SECRET_DATA

#: Cipher settings qemu-img creates: (cipher-alg, cipher-mode, ivgen-alg, ivgen-hash-alg, hash-alg).
CIPHERS = [
    ("aes-256", "xts", "plain64", None, "sha256"),  # QEMU's default
    ("aes-128", "xts", "plain64", None, "sha1"),
    ("aes-192", "xts", "plain", None, "sha512"),
    ("aes-128", "cbc", "essiv", "sha256", "sha256"),  # the classic cryptsetup setting
    ("aes-256", "cbc", "plain64", None, "sha256"),
    ("aes-128", "cbc", "plain", None, "sha1"),
    ("aes-256", "xts", "essiv", "sha256", "sha256"),
]
CIPHER_IDS = ["-".join(p for p in c if p) for c in CIPHERS]


def luks_opts(cipher: tuple[str, str, str, str | None, str]) -> dict[str, object]:
    alg, mode, ivgen, ivhash, hashalg = cipher
    opts: dict[str, object] = {
        "encrypt.format": "luks",
        "encrypt.key-secret": qi.SECRET_ID,
        "encrypt.iter-time": 10,
        "encrypt.cipher-alg": alg,
        "encrypt.cipher-mode": mode,
        "encrypt.ivgen-alg": ivgen,
        "encrypt.hash-alg": hashalg,
    }
    if ivhash is not None:
        opts["encrypt.ivgen-hash-alg"] = ivhash
    return opts


def qemu_raw(ref: qi.ImageRef, out: Path) -> bytes:
    """The guest disk as qemu-img reads it (with the secret)."""
    qi.qemu_img("convert", *ref.qemu_img_args(), "-O", "raw", str(out))
    return out.read_bytes()


def our_disk(path: Path, secret: str | bytes = SECRET) -> bytes:
    with qcow2ovl.open(path, secret=secret) as img:
        return img.read(0, img.virtual_size)


def pattern_writes(size: int, seed: int) -> list[str]:
    """qemu-io commands: data of varied patterns and alignments, zeroes, discards."""
    rng = random.Random(seed)
    cmds = []
    for _ in range(24):
        off = rng.randrange(0, size - 256 * KiB) // 512 * 512
        length = rng.choice([512, 4 * KiB, 64 * KiB, 100 * KiB, 192 * KiB])
        cmds.append(f"write -P {rng.randrange(1, 255):#x} {off} {length}")
    cmds += [f"write -z {size // 4} 64k", f"discard {size // 2} 128k", "write -c -P 0x77 0 64k"]
    return cmds


@pytest.fixture(scope="module")
def made(module_tmp_path: Path) -> dict[str, qi.ImageRef]:
    """One qemu-made image per cipher and cluster layout, with data written by qemu-io."""
    d = module_tmp_path
    refs: dict[str, qi.ImageRef] = {}
    layouts: list[tuple[str, dict[str, object]]] = [
        ("64k", {}),
        ("512", {"cluster_size": 512}),
        ("xl2", {"extended_l2": True, "cluster_size": 65536}),
    ]
    for cid, cipher in zip(CIPHER_IDS, CIPHERS, strict=True):
        for lname, layout in layouts:
            if lname != "64k" and cipher != CIPHERS[0]:
                continue
            key = f"{cid}-{lname}"
            ref = qi.create(
                d / f"{key}.qcow2", SIZE, opts={**luks_opts(cipher), **layout}, secret=True
            )
            qi.qemu_io(ref, *pattern_writes(SIZE, len(refs)))
            refs[key] = ref
    return refs


IMAGE_KEYS = [f"{c}-64k" for c in CIPHER_IDS] + [f"{CIPHER_IDS[0]}-512", f"{CIPHER_IDS[0]}-xl2"]


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


# ---- the command line, beside qemu-img and qemu-io ----------------------------------------------


def run_ours(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qcow2ovl", *args], capture_output=True, text=True, check=False
    )


def run_qemu(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = {"img": qi.QEMU_IMG, "io": qi.QEMU_IO}[tool]
    assert exe is not None
    return subprocess.run([exe, *args], capture_output=True, text=True, check=False)


def same_words(
    ours: subprocess.CompletedProcess[str], theirs: subprocess.CompletedProcess[str], tool: str
) -> None:
    """The same exit status and output, our program's name for QEMU's."""
    name = {"img": "qemu-img:", "io": "qemu-io:"}[tool]
    assert ours.returncode == theirs.returncode, (ours.stderr, theirs.stderr)
    assert ours.stderr.replace("qcow2ovl:", name) == theirs.stderr
    assert ours.stdout == theirs.stdout


OBJ = ["--object", qi.SECRET_OBJECT]
ENC = f"encrypt.format=luks,encrypt.key-secret={qi.SECRET_ID},encrypt.iter-time=10"


def opts_for(path: Path, secret_id: str = qi.SECRET_ID) -> str:
    return f"driver=qcow2,file.filename={path},encrypt.key-secret={secret_id}"


def test_cli_create_prints_and_makes_what_qemu_img_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    extra = ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv"
    for o in (ENC, ENC + extra):
        ours = run_ours("create", "-f", "qcow2", *OBJ, "-o", o, "x.qcow2", "8M")
        theirs = run_qemu("img", "create", "-f", "qcow2", *OBJ, "-o", o, "x.qcow2", "8M")
        assert ours.returncode == theirs.returncode == 0, ours.stderr
        assert ours.stdout == theirs.stdout
        run_ours("create", "-q", "-f", "qcow2", *OBJ, "-o", o, "y.qcow2", "8M")
        ref = qi.ImageRef(tmp_path / "y.qcow2", secret=True)
        qi.qemu_io(ref, "write -P 0x42 0 64k")
        assert qi.check_is_clean(qi.qemu_check(ref))


@pytest.mark.parametrize(
    "objects, options",
    [
        (OBJ, "encrypt.format=luks"),  # no key-secret
        (OBJ, "encrypt.format=luks,encrypt.key-secret=sec9"),  # no such secret
        (OBJ, "encrypt.key-secret=sec0"),  # no format
        (OBJ, "encrypt.format=bogus,encrypt.key-secret=sec0"),
        (OBJ, ENC + ",encrypt.cipher-alg=aes-999"),
        (OBJ, ENC + ",encrypt.iter-time=abc"),
        (OBJ, ENC + ",encrypt.foo=1"),
        (["--object", "secret,id=sec0"], ENC),
        (["--object", "secret,data=x"], ENC),
        (["--object", "bogus,id=sec0"], ENC),
        (["--object", "secret,id=sec0,data=x,file=y"], ENC),
        (["--object", "secret,id=sec0,data=x,format=hex"], ENC),
    ],
)
def test_cli_create_refusals_in_qemu_img_words(
    objects: list[str], options: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ours = run_ours("create", "-f", "qcow2", *objects, "-o", options, "x.qcow2", "1M")
    theirs = run_qemu(
        "img", "create", "-q", "-f", "qcow2", *objects, "-o", options, "x.qcow2", "1M"
    )
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr.replace("qcow2ovl:", "qemu-img:") == theirs.stderr


def mask_timing(text: str) -> str:
    """qemu-io's output without its timings."""
    return re.sub(r"; [\d:.]+ sec \(.*\)", "", text)


def test_cli_io_reads_and_writes_as_qemu_io(made: dict[str, qi.ImageRef], tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    shutil.copyfile(made[IMAGE_KEYS[0]].path, a)
    shutil.copyfile(a, b)
    (tmp_path / "sec.txt").write_bytes(SECRET.encode())
    (tmp_path / "sec64.txt").write_text(base64.b64encode(SECRET.encode()).decode())
    secrets = [
        qi.SECRET_OBJECT,
        f"secret,id=sec0,file={tmp_path / 'sec.txt'}",
        f"secret,id=sec0,file={tmp_path / 'sec64.txt'},format=base64",
    ]
    cmds = ["-c", "write -P 0x5a 1000 70000", "-c", "read -P 0x5a 1000 70000", "-c", "map"]
    for obj in secrets:
        ours = run_ours("io", "--object", obj, "--image-opts", opts_for(a), *cmds)
        theirs = run_qemu("io", "--object", obj, "--image-opts", opts_for(b), *cmds)
        assert ours.returncode == theirs.returncode == 0, ours.stderr
        assert mask_timing(ours.stdout) == mask_timing(theirs.stdout)
    assert qemu_raw(qi.ImageRef(a, secret=True), tmp_path / "a.raw") == qemu_raw(
        qi.ImageRef(b, secret=True), tmp_path / "b.raw"
    )


@pytest.mark.parametrize(
    "obj, opts",
    [
        ("secret,id=sec0,data=wrong", "{path}"),  # a wrong secret
        (qi.SECRET_OBJECT, "driver=qcow2,file.filename={path},encrypt.key-secret=sec9"),
        (qi.SECRET_OBJECT, "driver=qcow2,file.filename={path}"),  # none named
        (qi.SECRET_OBJECT, "driver=qcow2"),
        (qi.SECRET_OBJECT, "driver=vmdk2,file.filename={path}"),
        ("secret,id=sec0,file=/nonexistent/secret", "{path}"),
    ],
)
def test_cli_io_refusals_in_qemu_io_words(
    obj: str, opts: str, made: dict[str, qi.ImageRef]
) -> None:
    path = made[IMAGE_KEYS[0]].path
    spec = opts.format(path=path) if opts != "{path}" else opts_for(path)
    ours = run_ours("io", "--object", obj, "--image-opts", spec, "-c", "read 0 512")
    theirs = run_qemu("io", "--object", obj, "--image-opts", spec, "-c", "read 0 512")
    assert ours.stderr.replace("qcow2ovl:", "qemu-io:") == theirs.stderr
    assert ours.returncode == theirs.returncode == 1


def test_cli_convert_and_compare_with_secrets(made: dict[str, qi.ImageRef], tmp_path: Path) -> None:
    src = made[IMAGE_KEYS[3]].path
    out_ours, out_theirs = tmp_path / "o.raw", tmp_path / "t.raw"
    args = [*OBJ, "-O", "raw", "--image-opts", opts_for(src)]
    assert run_ours("convert", *args, str(out_ours)).returncode == 0
    assert run_qemu("img", "convert", *args, str(out_theirs)).returncode == 0
    assert out_ours.read_bytes() == out_theirs.read_bytes()
    # Into a new encrypted image, from raw and from an encrypted one.
    enc = tmp_path / "enc.qcow2"
    r = run_ours("convert", *OBJ, "-O", "qcow2", "-o", ENC, str(out_ours), str(enc))
    assert r.returncode == 0, r.stderr
    assert qemu_raw(qi.ImageRef(enc, secret=True), tmp_path / "e.raw") == out_ours.read_bytes()
    assert qi.check_is_clean(qi.qemu_check(qi.ImageRef(enc, secret=True)))
    enc2 = tmp_path / "enc2.qcow2"
    r = run_ours(
        "convert", *OBJ, "-O", "qcow2", "-o", ENC, "--image-opts", opts_for(src), str(enc2)
    )
    assert r.returncode == 0, r.stderr
    cmp = [*OBJ, "--image-opts", opts_for(src), opts_for(enc2)]
    same_words(run_ours("compare", *cmp), run_qemu("img", "compare", *cmp), "img")
    # Compression into an encrypted image would store plaintext: refused.
    r = run_ours(
        "convert", *OBJ, "-c", "-O", "qcow2", "-o", ENC, str(out_ours), str(tmp_path / "c.qcow2")
    )
    assert r.returncode == 1 and "stored unencrypted" in r.stderr


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


def test_served_over_nbd_with_its_secret(made: dict[str, qi.ImageRef], tmp_path: Path) -> None:
    """Clients of the NBD export read and write plaintext; the file holds only ciphertext."""
    path = tmp_path / "n.qcow2"
    shutil.copyfile(made[IMAGE_KEYS[0]].path, path)
    want = qemu_raw(qi.ImageRef(path, secret=True), tmp_path / "before.raw")
    with qcow2ovl.serve(path, socket=tmp_path / "s.sock", secret=SECRET) as uri:
        io = run_qemu(
            "io",
            "-f",
            "raw",
            "-c",
            "write -P 0x6b 1000 70000",
            "-c",
            "read -P 0x6b 1000 70000",
            uri,
        )
        assert io.returncode == 0 and "read 70000/70000" in io.stdout, io
        out = tmp_path / "over-nbd.raw"
        assert run_qemu("img", "convert", "-f", "raw", "-O", "raw", uri, str(out)).returncode == 0
    mirror = bytearray(want)
    mirror[1000:71000] = b"\x6b" * 70000
    assert out.read_bytes() == bytes(mirror)
    assert qemu_raw(qi.ImageRef(path, secret=True), tmp_path / "after.raw") == bytes(mirror)


def test_serve_refuses_an_encrypted_image_without_its_secret(
    made: dict[str, qi.ImageRef], tmp_path: Path
) -> None:
    path = made[IMAGE_KEYS[0]].path
    for args in ([str(path)], [*OBJ, "--image-opts", opts_for(path, "sec9")]):
        ours = run_ours("serve", "-k", str(tmp_path / "o.sock"), *args)
        theirs = run_qemu_nbd("-k", str(tmp_path / "t.sock"), *args)
        assert ours.returncode == theirs.returncode == 1
        assert ours.stderr.replace("qcow2ovl:", "qemu-nbd:") == theirs.stderr


def run_qemu_nbd(*args: str) -> subprocess.CompletedProcess[str]:
    assert qi.QEMU_NBD is not None
    return subprocess.run(
        [qi.QEMU_NBD, *args], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.parametrize("verb", [["check"], ["snapshot", "-l"]])
def test_metadata_verbs_take_image_opts_as_qemu_img(
    verb: list[str], made: dict[str, qi.ImageRef]
) -> None:
    """`check` and `snapshot -l` accept qemu-img's `--object`/`--image-opts` form (they need no
    secret here, and print what qemu-img prints with one)."""
    args = [*verb, *OBJ, "--image-opts", opts_for(made[IMAGE_KEYS[0]].path)]
    same_words(run_ours(*args), run_qemu("img", *args), "img")


#: Commands that change or measure only metadata, in qemu-img's `--object`/`--image-opts`
#: form (`{}` is the options string); the last two name a secret no `--object` defines.
METADATA_COMMANDS = [
    ["resize", *OBJ, "--image-opts", "{}", "+1M"],
    ["bitmap", *OBJ, "--add", "--image-opts", "{}", "b0"],
    ["rebase", *OBJ, "-u", "-b", "", "--image-opts", "{}"],
    ["measure", *OBJ, "-O", "qcow2", "--image-opts", "{}"],
    ["check", *OBJ, "--image-opts", "{sec9}"],
    ["resize", *OBJ, "--image-opts", "{sec9}", "+1M"],
]


@pytest.mark.parametrize("command", METADATA_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_metadata_commands_take_image_opts_as_qemu_img(
    command: list[str],
    made: dict[str, qi.ImageRef],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`resize`, `bitmap`, `rebase` and `measure` accept qemu-img's `--object`/`--image-opts`
    form too, print what qemu-img prints (or refuse in its words), and leave twin images with
    the same metadata. (Each twin is `disk.qcow2` in its own folder, so that the messages that
    name it are the same.)"""
    infos = []
    for who in ("ours", "theirs"):
        (tmp_path / who).mkdir()
        monkeypatch.chdir(tmp_path / who)
        path = Path("disk.qcow2")
        shutil.copyfile(made[IMAGE_KEYS[0]].path, path)
        opts = {"{}": opts_for(path), "{sec9}": opts_for(path, "sec9")}
        args = [opts.get(a, a) for a in command]
        if who == "ours":
            ours = run_ours(*args)
        else:
            theirs = run_qemu("img", *args)
        info = qi.qemu_info(qi.ImageRef(path, secret=True))
        infos.append({k: v for k, v in info.items() if k not in ("filename", "children")})
    same_words(ours, theirs, "img")
    assert infos[0] == infos[1]


def luks_area(path: Path) -> int:
    """Where the LUKS header of qcow2 image *path* starts (its crypto header extension)."""
    data = path.read_bytes()[:65536]
    (at,) = struct.unpack_from(">I", data, 100)
    while at + 8 <= len(data):
        kind, length = struct.unpack_from(">II", data, at)
        if kind == 0x0537BE77:
            return int(struct.unpack_from(">Q", data, at + 8)[0])
        assert kind != 0, "no crypto header extension"
        at += 8 + (length + 7) // 8 * 8
    raise AssertionError("no crypto header extension")


@pytest.mark.parametrize(
    "where, byte", [(1, 0), (7, 9), (40, ord("q"))], ids=["magic", "version", "mode"]
)
def test_info_refuses_a_damaged_luks_header_in_qemu_words(
    where: int, byte: int, made: dict[str, qi.ImageRef], tmp_path: Path
) -> None:
    """`info` reads the LUKS header as QEMU opens it, without the secret: a damaged one is
    refused with QEMU's message (after the file's name, as our other open errors)."""
    path = tmp_path / "d.qcow2"
    shutil.copyfile(made[IMAGE_KEYS[0]].path, path)
    with open(path, "r+b") as f:
        f.seek(luks_area(path) + where)
        f.write(bytes([byte]))
    ours = run_ours("info", str(path))
    theirs = run_qemu("img", "info", str(path))
    assert ours.returncode == theirs.returncode == 1
    prefix = f"qemu-img: Could not open '{path}': "
    assert theirs.stderr.startswith(prefix), theirs.stderr
    assert ours.stderr == f"qcow2ovl: {path}: {theirs.stderr.removeprefix(prefix)}"
