"""Creating qcow2 images: :func:`create`, with qemu-img's options and messages."""

from __future__ import annotations

import os

from qcow2ovl import _core

# Startup time: typing is for type checkers only (see qcow2ovl.image).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Literal, Union

    #: Accepted ``version`` values: the format version, or qemu-img's ``compat`` names.
    VersionSpec = Union[int, str]
    #: Accepted ``preallocation`` values.
    Preallocation = Literal["off", "metadata", "falloc", "full"]
    #: Accepted ``locking`` values (QEMU's ``file.locking``).
    Locking = Literal["auto", "on", "off"]

_VERSIONS: dict[object, int] = {2: 2, 3: 3, "0.10": 2, "1.1": 3, "v2": 2, "v3": 3}
_COMPRESSION: dict[str, str] = {"zlib": "zlib", "deflate": "zlib", "zstd": "zstd"}
_PREALLOCATION = ("off", "metadata", "falloc", "full")
#: The largest size qemu-img accepts on its command line.
MAX_SIZE = 2**63 - 1
#: Block devices have whole 512-byte sectors: a raw backing file's size is rounded up to them.
_SECTOR = 512


def _not_accepted(parameter: str, value: object) -> ValueError:
    return ValueError(f"Parameter '{parameter}' does not accept value '{value}'")


def _version(version: VersionSpec) -> int:
    if isinstance(version, bool) or version not in _VERSIONS:
        raise _not_accepted("version", version)
    return _VERSIONS[version]


def _resolve(image: str, name: str) -> str:
    """A backing file name as QEMU resolves it: relative to the image's folder."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(image), name)


def _backing_size(path: str, fmt: str) -> int:
    """Virtual size of the backing image at *path* (raises OSError if it cannot be opened)."""
    if fmt == "qcow2":
        from qcow2ovl.image import open as open_image

        # As qemu-img: the size is read with force-share, beside any user of the backing file.
        with open_image(path, overlap_check="none", force_share=True) as backing:
            return backing.info.virtual_size
    if fmt == "raw":
        size = os.path.getsize(path)
        return -(-size // _SECTOR) * _SECTOR
    raise ValueError(f"Cannot read the size of a '{fmt}' backing file; give the size explicitly")


def create(
    path: str | os.PathLike[str],
    size: int | None = None,
    *,
    cluster_size: int = 65536,
    version: VersionSpec = 3,
    refcount_bits: int = 16,
    extended_l2: bool = False,
    lazy_refcounts: bool = False,
    compression_type: str = "zlib",
    backing_file: str | None = None,
    backing_format: str | None = None,
    data_file: str | None = None,
    data_file_raw: bool = False,
    preallocation: Preallocation = "off",
    overwrite: bool = False,
    locking: Locking = "auto",
    encrypt: Mapping[str, object] | None = None,
) -> None:
    """Create a qcow2 image at *path*, as ``qemu-img create -f qcow2`` would.

    *size* is the virtual size in bytes (rounded up to a multiple of 512); it may be omitted
    only with a backing file, whose virtual size is then used (a qcow2 backing file's, or a raw
    one's length). *version* is 2 or 3, or qemu-img's compat names ``"0.10"`` and ``"1.1"``.
    *compression_type* is ``"zlib"`` (also ``"deflate"``) or ``"zstd"``. *preallocation* is
    ``"off"``, ``"metadata"`` (every L2 table and data cluster allocated, file sparse),
    ``"falloc"`` (space reserved) or ``"full"`` (zeros written).

    *backing_file* and *data_file* are stored as given. QEMU looks for a relative backing file
    in the image's folder, but for a relative data file in its working directory (when it
    creates the image and when it opens it); the data file is created (or, with *overwrite*,
    truncated) accordingly, with the virtual size. *backing_format* is required with a backing
    file, as in qemu-img.

    The new files are locked as QEMU locks a file it creates (*locking* as for
    :func:`qcow2ovl.open`): a file that another process has open as an image — a running VM,
    ``qemu-io``, a qcow2ovl handle — is refused with :class:`~qcow2ovl.LockError` and left
    byte for byte as it was, even with *overwrite* (which empties a file only once it is
    locked).

    *encrypt* makes a LUKS-encrypted image, as qemu-img's ``encrypt.*`` options do:
    ``{"format": "luks", "key_secret": SECRET}`` with, optionally, ``cipher_alg``
    (``"aes-128"``, ``"aes-192"``, ``"aes-256"``: the default), ``cipher_mode`` (``"xts"``: the
    default, ``"cbc"``, ``"ecb"``, ``"ctr"``), ``ivgen_alg`` (``"plain64"``: the default,
    ``"plain"``, ``"essiv"``), ``ivgen_hash_alg`` and ``hash_alg`` (``"sha256"`` by default;
    ``md5``, ``sha1``, ``sha224``, ``sha384``, ``sha512``, ``ripemd160``), and ``iter_time``
    (milliseconds of key derivation per unlock, 2000 by default). *SECRET* is the passphrase
    itself (``str``, encoded as UTF-8, or ``bytes``), not the id of a secret object. Legacy
    AES (``"format": "aes"``) is refused: it is insecure, and QEMU no longer writes it.

    Raises :class:`FileExistsError` if *path* (or the data file) exists, unless *overwrite*;
    :class:`ValueError` with QEMU's message for an invalid option or combination;
    :class:`OSError` if the backing file cannot be opened or a file cannot be written. On
    failure nothing this call created is left behind.
    """
    fspath = os.fspath(path)
    ver = _version(version)
    compression = _COMPRESSION.get(compression_type)
    if compression is None:
        raise _not_accepted("compression-type", compression_type)
    if preallocation not in _PREALLOCATION:
        raise _not_accepted("preallocation", preallocation)
    if size is not None and (isinstance(size, bool) or not 0 <= size <= MAX_SIZE):
        raise ValueError(f"Invalid image size specified. Must be between 0 and {MAX_SIZE}.")
    if backing_file is not None:
        if backing_format is None:
            raise ValueError("Backing file specified without backing format")
        backing_path = _resolve(fspath, backing_file)
        if size is None:
            size = _backing_size(backing_path, backing_format)
        elif not os.path.exists(backing_path):
            raise FileNotFoundError(
                2, f"Could not open backing image '{backing_file}'", backing_path
            )
    if size is None:
        raise ValueError("Image creation needs a size parameter")
    luks = _encrypt_options(encrypt) if encrypt is not None else None
    _core.create_image(
        fspath,
        size,
        cluster_size=cluster_size,
        version=ver,
        refcount_bits=refcount_bits,
        extended_l2=extended_l2,
        lazy_refcounts=lazy_refcounts,
        compression_type=compression,
        backing_file=backing_file,
        backing_format=backing_format,
        data_file=data_file,
        data_file_raw=data_file_raw,
        preallocation=preallocation,
        overwrite=overwrite,
        locking=locking,
        encrypt=luks,
    )


#: ``encrypt`` keys of :func:`create`, with the names qemu-img gives them.
_ENCRYPT_KEYS = {
    "format": "format",
    "key_secret": "key-secret",
    "cipher_alg": "cipher-alg",
    "cipher_mode": "cipher-mode",
    "ivgen_alg": "ivgen-alg",
    "ivgen_hash_alg": "ivgen-hash-alg",
    "hash_alg": "hash-alg",
    "iter_time": "iter-time",
}


def _encrypt_options(encrypt: Mapping[str, object]) -> dict[str, object]:
    """*encrypt* checked as qemu-img checks its ``encrypt.*`` options, for the core."""
    unknown = [k for k in encrypt if k not in _ENCRYPT_KEYS]
    if unknown:
        raise ValueError(f"Invalid parameter 'encrypt.{_ENCRYPT_KEYS.get(unknown[0], unknown[0])}'")
    fmt = encrypt.get("format", "luks")
    if fmt == "aes":
        raise ValueError(
            "Creating images with legacy AES encryption is not supported (it is insecure): "
            "use format 'luks'"
        )
    if fmt != "luks":
        raise _not_accepted("format", fmt)
    secret = encrypt.get("key_secret")
    if secret is None:
        raise ValueError(_core.KEY_SECRET_REQUIRED)
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, (bytes, bytearray, memoryview)):
        raise TypeError("encrypt['key_secret'] must be str or bytes")
    out: dict[str, object] = {k: v for k, v in encrypt.items() if k not in ("format", "key_secret")}
    iter_time = out.get("iter_time")
    if iter_time is not None and (isinstance(iter_time, bool) or not isinstance(iter_time, int)):
        raise _not_accepted("iter-time", iter_time)
    out["key_secret"] = bytes(secret)
    return out
