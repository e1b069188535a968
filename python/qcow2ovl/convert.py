"""Copying a guest disk to a new (or existing) image: :func:`convert`, ``qemu-img convert``'s
work done by the Rust pipeline (``_core.convert_disk``), configured here.

The pipeline reads the source where it holds data (the guest map of a qcow2 chain, the data
ranges of a sparse raw file), leaves zeros out, compresses on worker threads and writes a
qcow2 target through its guarded engine, without the GIL.
"""

from __future__ import annotations

import os
import sys

from qcow2ovl import _core

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from dataclasses import dataclass
    from typing import Any, Literal

    from qcow2ovl.image import Bitmap, Image

    CacheMode = Literal["writeback", "writethrough", "unsafe", "none", "directsync"]
else:
    from qcow2ovl._frozen import dataclass

#: Formats read and written.
FORMATS = ("qcow2", "raw")
#: QEMU's other image formats: known, but not read or written here.
_OTHER_FORMATS = frozenset(
    "bochs cloop dmg luks parallels qcow qed vdi vhdx vmdk vpc vvfat".split()
)


def _unknown_format(fmt: str, what: str) -> ValueError:
    if fmt in _OTHER_FORMATS:
        return ValueError(f"convert: {what} format '{fmt}' is not supported (qcow2 and raw are)")
    return ValueError(f"Unknown file format '{fmt}'")


#: Virtual sizes of qcow2 images are whole sectors.
_SECTOR = 512


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert` did: guest bytes of the disk (``total``), read from the source
    (``read``: holes and zero clusters are not read), written as data (``written``) and as
    zeros (``zeroed``: only when the target did not already read as zeros), and the clusters
    stored compressed (``compressed_clusters``)."""

    total: int
    read: int
    written: int
    zeroed: int
    compressed_clusters: int


def _source_format(path: str, fmt: str | None) -> str:
    if fmt is None:
        from qcow2ovl._format import probe_format

        fmt = probe_format(path)
    if fmt not in FORMATS:
        raise _unknown_format(fmt, "source")
    return fmt


def _bitmaps_to_copy(image: Image, skip_broken: bool) -> list[Bitmap]:
    """The source's bitmaps that ``bitmaps=True`` copies. An inconsistent one fails the
    convert before anything is written, or with *skip_broken* is skipped with a warning
    (qemu-img looks at them last to first, and so names them in that order)."""
    found = image.bitmaps
    for b in reversed(found):
        if not b.inconsistent:
            continue
        if not skip_broken:
            raise ValueError(
                f"Cannot copy inconsistent bitmap '{b.name}'\nTry --skip-broken-bitmaps, or "
                "use 'qemu-img bitmap --remove' to delete it"
            )
        print(f"qcow2ovl: warning: Skipping inconsistent bitmap '{b.name}'", file=sys.stderr)
    return [b for b in found if not b.inconsistent]


def convert(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    source_format: str | None = None,
    output_format: str = "raw",
    options: Mapping[str, Any] | None = None,
    compress: bool = False,
    backing_file: str | None = None,
    backing_format: str | None = None,
    create: bool = True,
    target_is_zero: bool = False,
    min_sparse: int = 4096,
    parallel: int = 8,
    out_of_order: bool = False,
    cache_mode: CacheMode = "writeback",
    snapshot: str | None = None,
    force_share: bool = False,
    bitmaps: bool = False,
    skip_broken_bitmaps: bool = False,
    progress: Callable[[int, int], object] | None = None,
    source_secret: str | bytes | None = None,
    output_secret: str | bytes | None = None,
) -> ConvertResult:
    """Copy the guest disk of *source* (a qcow2 image with its backing chain, or a raw file;
    *source_format* ``"qcow2"`` or ``"raw"``, probed by default) to *output*, as
    ``qemu-img convert`` does.

    *output_format* is ``"raw"`` (the default, as in qemu-img) or ``"qcow2"``; a qcow2 output
    is created with :func:`qcow2ovl.create`'s keyword arguments from *options*
    (``cluster_size``, ``version``, ...) and written through the guarded engine. An existing
    output file is replaced, unless *create* is false (qemu-img's ``-n``): then it must exist
    and be at least as large as the source, and ranges of zeros are written as zeros unless
    *target_is_zero* says it already reads as zeros (``--target-is-zero``).

    *backing_file* (qemu-img's ``-B``, with *backing_format*, which is then required) makes
    the output an overlay of that file: only what the source's own layer holds is copied, and
    what it leaves to its backing chain is left to the output's. The same holds with
    ``create=False`` for an output that has a backing file.

    Ranges known to read as zeros are not read, and data that reads as zeros is not written,
    in runs of at least *min_sparse* bytes (``-S``; 0 writes every byte, so the output is
    fully allocated). *compress* (``-c``) stores every cluster that shrinks compressed, with
    the output's compression type. *parallel* (``-m``, 1 to 16) bounds the worker threads
    (which never outnumber the cores); *out_of_order* (``-W``) writes chunks as they are ready.
    *snapshot* reads that internal snapshot of a qcow2 source; *force_share* (``-U``) opens the
    source beside a writer. *bitmaps* copies the source's persistent bitmaps (qcow2 to qcow2),
    failing on an inconsistent one unless *skip_broken_bitmaps*.

    Encrypted images: *source_secret* unlocks an encrypted source (see :func:`qcow2ovl.open`).
    An ``encrypt`` entry in *options* (see :func:`qcow2ovl.create`) makes a new encrypted
    output, written with its ``key_secret``; *output_secret* unlocks an existing encrypted
    output (``create=False``). Compressed output is refused for an encrypted image (QEMU would
    store the compressed clusters in plaintext).

    *cache_mode* is the output's ``cache=`` mode (see :func:`qcow2ovl.open`): with the
    default ``"writeback"`` every byte is on disk when this returns; ``"unsafe"`` skips the
    ``fdatasync``, as ``qemu-img convert`` does by default (``qcow2ovl convert`` does too).
    *progress* is called as ``progress(done, total)`` with rising guest byte counts, from 0 to
    the disk's size. ``KeyboardInterrupt`` stops the copy at the next chunk, leaving the output
    consistent (but incomplete).
    """
    from qcow2ovl.image import open as open_image

    src_path, out_path = os.fspath(source), os.fspath(output)
    fmt = _source_format(src_path, source_format)
    if output_format not in FORMATS:
        raise _unknown_format(output_format, "output")
    if compress and output_format != "qcow2":
        raise ValueError("Compression not supported for this file format")
    if not 1 <= parallel <= 16:
        raise ValueError("Invalid number of coroutines specified. Must be between 1 and 16.")
    if min_sparse < 0:
        raise ValueError(
            f"Invalid buffer size for sparse output specified. Must be between 0 and {2**63 - 1}."
        )
    if target_is_zero and create:
        raise ValueError("--target-is-zero requires use of -n flag")
    if backing_file is not None and output_format != "qcow2":
        raise ValueError(f"Backing file not supported for file format '{output_format}'")
    if backing_file is not None and backing_format is None and create:
        raise ValueError("Use of backing file requires explicit backing format")
    if options and output_format != "qcow2":
        raise ValueError("convert: options apply to qcow2 output only")
    if snapshot is not None and fmt != "qcow2":
        raise ValueError("convert: a snapshot needs a qcow2 source")
    if skip_broken_bitmaps and not bitmaps:
        raise ValueError("Use of --skip-broken-bitmaps requires --bitmaps")
    if bitmaps and output_format != "qcow2":
        raise ValueError(f"Format driver '{output_format}' does not support bitmaps")
    encrypt = (options or {}).get("encrypt")
    if output_secret is None and encrypt is not None:
        output_secret = encrypt.get("key_secret")
    if compress and (encrypt is not None or output_secret is not None):
        raise ValueError(
            "Compressed writes into encrypted images are refused: compressed clusters are "
            "stored unencrypted"
        )

    src_image = (
        open_image(
            src_path,
            overlap_check="none",
            snapshot=snapshot,
            force_share=force_share,
            secret=source_secret,
        )
        if fmt == "qcow2"
        else None
    )
    try:
        size = src_image.virtual_size if src_image is not None else os.path.getsize(src_path)
        copied = _bitmaps_to_copy(src_image, skip_broken_bitmaps) if bitmaps and src_image else []
        if create:
            _create_output(
                out_path, output_format, size, options or {}, backing_file, backing_format
            )
        stats: dict[str, int]
        if output_format == "raw":
            if not create and os.path.getsize(out_path) < size:
                raise ValueError("output file is smaller than input file")
            stats = _core.convert_disk(
                src_image._core if src_image is not None else src_path,
                out_path,
                compress=False,
                min_sparse=min_sparse,
                target_is_zero=create or target_is_zero,
                parallel=parallel,
                out_of_order=out_of_order,
                force_share=force_share,
                cache=cache_mode,
                progress=progress,
            )
        else:
            with open_image(
                out_path, writable=True, cache_mode=cache_mode, secret=output_secret
            ) as target:
                if target.virtual_size < size:
                    raise ValueError("output file is smaller than input file")
                has_backing = target.info.backing_file is not None
                with target._reporting():
                    stats = _core.convert_disk(
                        src_image._core if src_image is not None else src_path,
                        target._core,
                        compress=compress,
                        min_sparse=min_sparse,
                        target_is_zero=(create and not has_backing) or target_is_zero,
                        target_has_backing=has_backing,
                        source_layers=1 if has_backing else None,
                        parallel=parallel,
                        out_of_order=out_of_order,
                        force_share=force_share,
                        progress=progress,
                    )
                # Added after the data, so that the copy's own writes do not mark them.
                for b in copied:
                    target.add_bitmap(b.name, granularity=b.granularity, enabled=b.enabled)
                    target.merge_bitmap(b.name, b.name, source_image=src_image)
    finally:
        if src_image is not None:
            src_image.close()
    return ConvertResult(**stats)


def _create_output(
    path: str,
    fmt: str,
    size: int,
    options: Mapping[str, Any],
    backing_file: str | None,
    backing_format: str | None,
) -> None:
    """The new output file: a qcow2 image as large as the source (in whole sectors), or an
    empty raw file of the source's length."""
    if fmt == "raw":
        with open(path, "wb") as out:
            out.truncate(size)
        return
    from qcow2ovl.create import create

    kwargs = dict(options)
    if backing_file is not None:
        kwargs["backing_file"] = backing_file
        kwargs["backing_format"] = backing_format
    create(path, -(-size // _SECTOR) * _SECTOR, overwrite=True, **kwargs)


__all__ = ["ConvertResult", "convert"]
