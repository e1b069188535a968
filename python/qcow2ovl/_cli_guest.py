"""The guest-data commands of the ``qcow2ovl`` command line: ``map --guest`` and ``convert``."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Iterator
from typing import Any

#: Bytes read and written per step of ``convert``.
CHUNK = 2 << 20


def guest_map(args: argparse.Namespace) -> int:
    """``qcow2ovl map --guest IMAGE``: the guest disk as ``qemu-img map`` shows it."""
    from qcow2ovl.image import open as open_image

    with open_image(
        args.image,
        overlap_check=args.overlap_check,
        snapshot=getattr(args, "snapshot", None),
        force_share=args.force_share,
    ) as image:
        rows = image._guest_map_rows()
        out = sys.stdout
        if args.output == "json":
            # Written as it goes, byte for byte as qemu-img writes it: a fragmented disk has
            # millions of entries.
            out.write("[")
            sep = ""
            for start, length, depth, present, zero, data, compressed, offset in rows:
                where = "}" if offset is None else f', "offset": {offset}}}'
                out.write(
                    f'{sep}{{ "start": {start}, "length": {length}, "depth": {depth}, '
                    f'"present": {_JSON[present]}, "zero": {_JSON[zero]}, '
                    f'"data": {_JSON[data]}, "compressed": {_JSON[compressed]}{where}'
                )
                sep = ",\n"
            out.write("]\n")
            return 0
        out.write(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n")
        for start, length, depth, _, _, data, _, offset in rows:
            if data and offset is not None:
                where = args.image if depth == 0 else f"(backing file, depth {depth})"
                out.write(f"{start:<#16x}{length:<#16x}{offset:<#16x}{where}\n")
    return 0


_JSON = {True: "true", False: "false"}


def _progress(done: int, total: int) -> None:
    pct = 100.0 if total == 0 else 100.0 * done / total
    sys.stdout.write(f"    ({pct:.2f}/100%)\r")
    sys.stdout.flush()


class _Source:
    """The guest disk to convert: a qcow2 image or a raw file, read in ranges; ``ranges()``
    yields ``(start, length, zero)`` covering the disk, where *zero* says the range surely reads
    as zeros (unallocated, a zero cluster, a hole in a sparse raw file)."""

    def __init__(
        self, path: str, fmt: str | None, snapshot: str | None = None, force_share: bool = False
    ) -> None:
        from qcow2ovl.image import open as open_image

        if fmt is None:
            from qcow2ovl._format import probe_format

            fmt = probe_format(path)
        if fmt not in ("qcow2", "raw"):
            raise ValueError(f"Unknown file format '{fmt}'")
        self.fmt = fmt
        if snapshot is not None and fmt != "qcow2":
            raise ValueError("convert: -l (a snapshot) needs a qcow2 source")
        self.image = (
            open_image(path, overlap_check="none", snapshot=snapshot, force_share=force_share)
            if fmt == "qcow2"
            else None
        )
        self.raw = open(path, "rb") if fmt == "raw" else None  # noqa: SIM115 - closed in close()
        if self.image is not None:
            self.size = self.image.virtual_size
        else:
            assert self.raw is not None
            self.size = os.fstat(self.raw.fileno()).st_size

    def ranges(self) -> Iterator[tuple[int, int, bool]]:
        if self.image is not None:
            for e in self.image.iter_guest_map():
                yield e.start, e.length, e.zero and not e.data
            return
        assert self.raw is not None
        fd, pos, size = self.raw.fileno(), 0, self.size
        while pos < size:
            try:
                data = min(os.lseek(fd, pos, os.SEEK_DATA), size)
            except OSError as exc:
                # ENXIO: nothing but a hole from here on; otherwise no SEEK_DATA: all data.
                yield pos, size - pos, exc.errno == errno.ENXIO
                return
            if data > pos:
                yield pos, data - pos, True
            if data == size:
                return
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
            yield data, hole - data, False
            pos = hole

    def readinto(self, pos: int, view: memoryview) -> None:
        if self.image is not None:
            self.image.readinto(pos, view)
            return
        assert self.raw is not None
        n = os.preadv(self.raw.fileno(), [view], pos)
        if n < len(view):
            view[n:] = bytes(len(view) - n)

    def close(self) -> None:
        if self.image is not None:
            self.image.close()
        if self.raw is not None:
            self.raw.close()


def _nonzero_runs(view: memoryview, granule: int, zeros: bytes) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of the runs of *view* made of *granule*-sized pieces that are not all
    zeros."""
    start = None
    n = len(view)
    for at in range(0, n, granule):
        end = min(at + granule, n)
        if zeros.startswith(view[at:end]):  # all zeros (a memcmp, no copies)
            if start is not None:
                yield start, at
                start = None
        elif start is None:
            start = at
    if start is not None:
        yield start, n


#: ``-o`` options of ``convert -O qcow2`` (qemu-img's names), with create()'s keyword for each.
_QCOW2_OPTIONS = {
    "cluster_size": "cluster_size",
    "compat": "version",
    "refcount_bits": "refcount_bits",
    "extended_l2": "extended_l2",
    "lazy_refcounts": "lazy_refcounts",
    "compression_type": "compression_type",
    "preallocation": "preallocation",
}


def _qcow2_options(specs: list[str]) -> dict[str, Any]:
    """create()'s keywords from ``-o key=value,...`` (qemu-img's syntax and names)."""
    from qcow2ovl import _cli_create as c

    kwargs: dict[str, Any] = {}
    for spec in specs:
        for key, value in c._split_options(spec):
            if key not in _QCOW2_OPTIONS:
                if key in c._KNOWN:
                    raise ValueError(f"convert: option '{key}' is not supported yet")
                raise ValueError(f"Invalid parameter '{key}'")
            if key == "cluster_size":
                kwargs["cluster_size"] = c._size_option(key, value)
            elif key == "refcount_bits":
                kwargs["refcount_bits"] = c._number(key, value)
            elif key in ("extended_l2", "lazy_refcounts"):
                kwargs[key] = c._bool(key, value)
            else:
                kwargs[_QCOW2_OPTIONS[key]] = value
    return kwargs


def convert(args: argparse.Namespace) -> int:
    """``qcow2ovl convert [-f FMT] [-O qcow2|raw] [-o OPTIONS] [-p] SOURCE OUTPUT``: copy the
    guest disk of a qcow2 image or a raw file to a new qcow2 image (written by qcow2ovl's
    guarded engine) or a sparse raw file, as ``qemu-img convert`` does (the default output
    format is raw, as there).

    Ranges that read as zeros (zero clusters, unallocated clusters without a backing file, holes
    and all-zero data) are not written: they stay unallocated in a qcow2 output and holes in a
    raw one. ``-o`` takes qemu-img create's qcow2 options (cluster_size, compat, refcount_bits,
    extended_l2, lazy_refcounts, compression_type, preallocation). An existing output file is
    replaced. With ``-c`` every non-zero cluster of a qcow2 output is stored compressed (the
    image's compression type: ``-o compression_type=zstd`` for zstd), except clusters that do not
    shrink, which are stored as they are (as qemu-img does).
    """
    if args.compress and args.output_format != "qcow2":
        raise ValueError("convert: compressed output (-c) needs -O qcow2")
    if args.output_format not in ("raw", "qcow2"):
        raise ValueError(f"convert: output format '{args.output_format}' is not supported yet")
    kwargs = _qcow2_options(args.options) if args.output_format == "qcow2" else None
    if args.options and kwargs is None:
        raise ValueError("convert: -o applies to -O qcow2 only")
    if args.skip_broken_bitmaps and not args.bitmaps:
        raise ValueError("Use of --skip-broken-bitmaps requires --bitmaps")
    if args.bitmaps and args.output_format != "qcow2":
        raise ValueError(f"Format driver '{args.output_format}' does not support bitmaps")
    source = _Source(args.image, args.source_format, args.snapshot, args.force_share)
    try:
        bitmaps = _bitmaps_to_copy(source, args.skip_broken_bitmaps) if args.bitmaps else []
        if kwargs is not None:
            _to_qcow2(source, args.output, kwargs, args.progress, args.compress, bitmaps)
        else:
            _to_raw(source, args.output, args.progress)
    finally:
        source.close()
    if args.progress:
        _progress(source.size, source.size)
        sys.stdout.write("\n")
    return 0


def _copy(source: _Source, write: Any, granule: int, progress: bool) -> None:
    """Calls ``write(offset, view)`` for every run of non-zero guest data of *source*."""
    zeros = bytes(CHUNK)
    buf = bytearray(CHUNK)
    done = 0
    for start, length, zero in source.ranges():
        if zero:
            done += length
            continue
        pos, end = start, start + length
        while pos < end:
            n = min(CHUNK, end - pos)
            view = memoryview(buf)[:n]
            source.readinto(pos, view)
            if not zeros.startswith(view):
                for a, b in _nonzero_runs(view, granule, zeros):
                    write(pos + a, view[a:b])
            pos += n
            done += n
            if progress:
                _progress(done, source.size)


def _to_raw(source: _Source, output: str, progress: bool) -> None:
    with open(output, "wb") as out:
        out.truncate(source.size)

        def write(offset: int, view: memoryview) -> None:
            out.seek(offset)
            out.write(view)

        _copy(source, write, CHUNK, progress)


def _bitmaps_to_copy(source: _Source, skip_broken: bool) -> list[Any]:
    """The source's bitmaps that ``--bitmaps`` copies. An inconsistent one fails the convert
    before anything is written, or with ``--skip-broken-bitmaps`` is skipped with a warning
    (qemu-img looks at them last to first, and so names them in that order)."""
    if source.image is None:
        return []
    found = source.image.bitmaps
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


def _to_qcow2(
    source: _Source,
    output: str,
    kwargs: dict[str, Any],
    progress: bool,
    compress: bool = False,
    bitmaps: list[Any] | None = None,
) -> None:
    from qcow2ovl.create import create
    from qcow2ovl.image import open as open_image

    size = -(-source.size // _SECTOR) * _SECTOR
    cluster_size = int(kwargs.get("cluster_size", 65536))
    create(output, size, overwrite=True, **kwargs)
    with open_image(output, writable=True) as image:
        if compress:
            _copy_compressed(source, image, cluster_size, progress)
        else:
            _copy(source, image.write, min(cluster_size, CHUNK), progress)
        # Added after the data, so that the copy's own writes do not mark them.
        for b in bitmaps or []:
            image.add_bitmap(b.name, granularity=b.granularity, enabled=b.enabled)
            image.merge_bitmap(b.name, b.name, source_image=source.image)


def _copy_compressed(source: _Source, image: Any, cluster_size: int, progress: bool) -> None:
    """Writes every output cluster that is not all zeros with ``Image.write_compressed``."""
    zero_ranges = [(s, s + n) for s, n, zero in source.ranges() if zero]
    zeros = bytes(cluster_size)
    buf = bytearray(cluster_size)
    z = 0
    for pos in range(0, source.size, cluster_size):
        n = min(cluster_size, source.size - pos)
        while z < len(zero_ranges) and zero_ranges[z][1] <= pos:
            z += 1
        if z < len(zero_ranges) and zero_ranges[z][0] <= pos and pos + n <= zero_ranges[z][1]:
            continue  # wholly inside a range known to read as zeros
        view = memoryview(buf)[:n]
        source.readinto(pos, view)
        if view != zeros[:n]:
            image.write_compressed(pos, view)
        if progress:
            _progress(pos + n, source.size)


#: Virtual sizes are whole sectors.
_SECTOR = 512


def _snapshot_arg(value: str) -> str:
    """qemu-img convert's ``-l`` forms: ``snapshot.name=N``, ``snapshot.id=I`` or a bare name."""
    for prefix in ("snapshot.name=", "snapshot.id="):
        if value.startswith(prefix):
            return value[len(prefix) :]
    return value


#: ``convert --help``'s description (plain text: argparse prints it as it is).
CONVERT_HELP = (
    "Copy the guest disk of a qcow2 image (with its backing chain) or a raw file to a new qcow2 "
    "image, written by qcow2ovl's guarded engine, or to a sparse raw file, as 'qemu-img "
    "convert' does; the default output format is raw, as there. Ranges that read as zeros are "
    "not written: they stay unallocated in a qcow2 output and holes in a raw one. -o takes "
    "qemu-img create's qcow2 options (cluster_size, compat, refcount_bits, extended_l2, "
    "lazy_refcounts, compression_type, preallocation). An existing output file is replaced. "
    "With -c every non-zero cluster of a qcow2 output is stored compressed with the image's "
    "compression type (-o compression_type=zstd for zstd), except clusters that do not shrink."
)


def add_parsers(sub: Any) -> None:
    """Adds ``convert`` to the command's subparsers."""
    p = sub.add_parser(
        "convert",
        help="copy the guest disk of a qcow2 image or raw file to qcow2 or raw",
        description=CONVERT_HELP,
    )
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-f", dest="source_format", help="source format (qcow2 or raw; default: probe)")
    p.add_argument("-O", dest="output_format", default="raw", help="output format (raw, qcow2)")
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="qcow2 output options, key=value,... (qemu-img create's names)",
    )
    p.add_argument(
        "-c", dest="compress", action="store_true", help="compressed output (qcow2 only)"
    )
    p.add_argument(
        "-l",
        "--snapshot",
        dest="snapshot",
        metavar="NAME_OR_ID",
        help="copy this internal snapshot's disk (qemu-img's -l snapshot.name=/snapshot.id= "
        "are accepted too)",
        type=_snapshot_arg,
    )
    p.add_argument(
        "--bitmaps",
        action="store_true",
        help="copy the persistent bitmaps too (qcow2 to qcow2)",
    )
    p.add_argument(
        "--skip-broken-bitmaps",
        action="store_true",
        help="with --bitmaps: skip inconsistent bitmaps instead of failing",
    )
    from qcow2ovl._cli_options import add_force_share

    add_force_share(p)
    p.add_argument("image", help="the qcow2 image or raw file to read")
    p.add_argument("output", help="the file to write (replaced if it exists)")
    p.set_defaults(func=convert)


__all__ = ["CHUNK", "add_parsers", "convert", "guest_map"]
