"""LUKS images made by QEMU for the encryption tests: the ciphers qemu-img writes, the cluster
layouts, qemu-io's writes into them, and the two ways of reading their guest disk (qemu-img
with the secret, and ours)."""

from __future__ import annotations

import random
from pathlib import Path

import qcow2ovl
import qemu_images as qi

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


#: The images `build_images` makes: one per cipher with 64 KiB clusters, and QEMU's default
#: cipher with 512-byte clusters and with extended L2 entries.
IMAGE_KEYS = [f"{c}-64k" for c in CIPHER_IDS] + [f"{CIPHER_IDS[0]}-512", f"{CIPHER_IDS[0]}-xl2"]


def build_images(d: Path, keys: list[str] | None = None) -> dict[str, qi.ImageRef]:
    """In folder *d*, one qemu-made image per key of *keys* (default: all of `IMAGE_KEYS`), with
    data written by qemu-io (the same for a key whichever others are made)."""
    layouts: dict[str, dict[str, object]] = {
        "64k": {},
        "512": {"cluster_size": 512},
        "xl2": {"extended_l2": True, "cluster_size": 65536},
    }
    ciphers = dict(zip(CIPHER_IDS, CIPHERS, strict=True))
    refs: dict[str, qi.ImageRef] = {}
    for seed, key in enumerate(IMAGE_KEYS):
        if keys is not None and key not in keys:
            continue
        cid, _, layout = key.rpartition("-")
        opts = {**luks_opts(ciphers[cid]), **layouts[layout]}
        ref = qi.create(d / f"{key}.qcow2", SIZE, opts=opts, secret=True)
        qi.qemu_io(ref, *pattern_writes(SIZE, seed))
        refs[key] = ref
    return refs
