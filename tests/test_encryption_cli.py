"""The command line and the NBD server on encrypted images, beside qemu-img, qemu-io and
qemu-nbd: secrets given as ``--object``, images as ``--image-opts`` strings, ``create -o
encrypt.*``; the same output, the same refusals in the same words, and images QEMU reads
back."""

from __future__ import annotations

import base64
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import qcow2ovl
import qemu_images as qi
from luks_images import IMAGE_KEYS, SECRET, build_images, qemu_raw

pytestmark = pytest.mark.skipif(not qi.HAVE_QEMU, reason="needs qemu-img and qemu-io")


@pytest.fixture(scope="module")
def made(module_tmp_path: Path) -> dict[str, qi.ImageRef]:
    """The two images of `luks_images.IMAGE_KEYS` these tests use, made by QEMU."""
    return build_images(module_tmp_path, [IMAGE_KEYS[0], IMAGE_KEYS[3]])


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
    refused with QEMU's message (after the file's name, as our other open errors), and
    `inspect` gives the image no clean verdict, for that reason."""
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
    verdict = qcow2ovl.inspect(path)
    assert not verdict.safe
    assert verdict.reasons == (ours.stderr.removeprefix("qcow2ovl: ").rstrip("\n"),)
