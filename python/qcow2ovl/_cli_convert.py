"""``qcow2ovl convert``: qemu-img convert's command line over :func:`qcow2ovl.convert`."""

from __future__ import annotations

import argparse

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: ``-o`` options of ``convert -O qcow2`` (qemu-img's names), with create()'s keyword for each.
_QCOW2_OPTIONS = {
    "cluster_size": "cluster_size",
    "compat": "version",
    "refcount_bits": "refcount_bits",
    "extended_l2": "extended_l2",
    "lazy_refcounts": "lazy_refcounts",
    "compression_type": "compression_type",
    "preallocation": "preallocation",
    "backing_file": "backing_file",
    "backing_fmt": "backing_format",
}

#: The cache modes ``-t`` and ``-T`` take (QEMU's names).
CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")


def qcow2_options(specs: list[str], objects: list[str] | None = None) -> dict[str, Any]:
    """create()'s keywords from ``-o key=value,...`` (qemu-img's syntax and names); the
    ``encrypt.*`` ones become ``encrypt``, its secret looked up among the ``--object`` ones."""
    from qcow2ovl import _cli_create as c

    kwargs: dict[str, Any] = {}
    encrypt: dict[str, str] = {}
    for spec in specs:
        for key, value in c._split_options(spec):
            if key.startswith("encrypt.") and key in c._KNOWN:
                encrypt[key] = value
                continue
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
    if encrypt:
        kwargs["encrypt"] = c.encrypt_options(objects or [], encrypt)
    return kwargs


def _sparse_size(text: str) -> int:
    """``-S``: a size in qemu-img's syntax, in range."""
    from qcow2ovl._cli_create import parse_size

    size = parse_size(text)
    if size is None:
        raise ValueError(f"Invalid buffer size for sparse output specified: '{text}'.")
    if size < 0 or size > 2**63 - 1:
        raise ValueError(
            f"Invalid buffer size for sparse output specified. Must be between 0 and {2**63 - 1}."
        )
    return size


def _cache(text: str) -> str:
    if text not in CACHE_MODES:
        raise ValueError(f"Invalid cache option: {text}")
    return text


def run(args: argparse.Namespace) -> int:
    """Run ``qcow2ovl convert``; qemu-img's exit status (0, or 1 on an error)."""
    from qcow2ovl._cli_progress import Progress
    from qcow2ovl.convert import convert

    if len(args.files) < 2:
        raise ValueError("Expecting one image file name")
    if len(args.files) > 2:
        raise ValueError("convert: more than one source image is not supported")
    source, output = args.files
    parallel = args.parallel
    if not parallel.isdigit() or not 1 <= int(parallel) <= 16:
        raise ValueError("Invalid number of coroutines specified. Must be between 1 and 16.")
    _cache(args.source_cache)
    cache = _cache(args.target_cache)
    options = qcow2_options(args.options, args.objects) if args.output_format == "qcow2" else {}
    from qcow2ovl._cli_secrets import OptionsError, image_opts, secrets

    found = secrets(args.objects)
    source_secret = output_secret = None
    if args.image_opts:
        opts = image_opts(source, found)
        source, source_secret = opts.filename, opts.secret
    if args.target_image_opts:
        if not args.no_create:
            raise OptionsError("--target-image-opts requires use of -n flag")
        opts = image_opts(output, found)
        output, output_secret = opts.filename, opts.secret
    if args.options and args.output_format != "qcow2":
        raise ValueError("convert: -o applies to -O qcow2 only")
    backing = args.backing_file or options.pop("backing_file", None)
    backing_format = args.backing_format or options.pop("backing_format", None)
    if backing_format is not None and backing is None:
        raise ValueError(
            f"{output}: error while converting {args.output_format}: Backing format cannot be "
            "used without backing file"
        )
    progress = Progress() if args.progress and not args.quiet else None
    convert(
        source,
        output,
        source_format=args.source_format,
        output_format=args.output_format,
        options=options,
        compress=args.compress,
        backing_file=backing,
        backing_format=backing_format,
        create=not args.no_create,
        target_is_zero=args.target_is_zero,
        min_sparse=_sparse_size(args.sparse_size),
        parallel=int(parallel),
        out_of_order=args.out_of_order,
        cache_mode=cache,  # type: ignore[arg-type]  # checked by _cache
        snapshot=args.snapshot,
        force_share=args.force_share,
        bitmaps=args.bitmaps,
        skip_broken_bitmaps=args.skip_broken_bitmaps,
        progress=progress,
        source_secret=source_secret,
        output_secret=output_secret,
    )
    if progress is not None:
        progress.end()
    return 0


def _snapshot_arg(value: str) -> str:
    """qemu-img convert's ``-l`` forms: ``snapshot.name=N``, ``snapshot.id=I`` or a bare name."""
    for prefix in ("snapshot.name=", "snapshot.id="):
        if value.startswith(prefix):
            return value[len(prefix) :]
    return value


#: ``convert --help``'s description (plain text: argparse prints it as it is).
HELP = (
    "Copy the guest disk of a qcow2 image (with its backing chain) or a raw file to a qcow2 "
    "image, written by qcow2ovl's guarded engine, or to a raw file, as 'qemu-img convert' "
    "does, with its options and defaults: the output format is raw unless -O qcow2, the "
    "output's cache mode is unsafe (no fdatasync; -t writeback for a durable copy), ranges "
    "that read as zeros are left out (-S 0 writes every byte), and an existing output file is "
    "replaced (-n writes into it instead). Holes of the source are not read; data is read, "
    "judged and compressed (-c) on worker threads."
)


def add_parser(sub: Any) -> None:
    """Adds ``convert`` to the command's subparsers."""
    p = sub.add_parser(
        "convert",
        help="copy the guest disk of a qcow2 image or raw file to qcow2 or raw",
        description=HELP,
    )
    p.add_argument("-p", "--progress", action="store_true", help="show progress")
    p.add_argument("-q", "--quiet", action="store_true", help="quiet operation")
    p.add_argument("-f", "--source-format", dest="source_format", help="qcow2 or raw (probed)")
    p.add_argument(
        "-O", "--target-format", dest="output_format", default="raw", help="raw or qcow2"
    )
    p.add_argument(
        "-o",
        "--target-options",
        dest="options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="qcow2 output options, key=value,... (qemu-img create's names)",
    )
    p.add_argument("-c", "--compress", action="store_true", help="compressed output (qcow2)")
    p.add_argument(
        "-t",
        "--target-cache",
        dest="target_cache",
        default="unsafe",
        metavar="CACHE",
        help="the output's cache mode (default unsafe, as qemu-img)",
    )
    p.add_argument(
        "-T",
        "--source-cache",
        dest="source_cache",
        default="writeback",
        metavar="CACHE",
        help="the source's cache mode (accepted; reads go through the page cache)",
    )
    p.add_argument(
        "-B", "--backing", dest="backing_file", metavar="BACKING", help="output on top of it"
    )
    p.add_argument("-F", "--backing-format", dest="backing_format", metavar="FMT")
    p.add_argument("-n", "--no-create", action="store_true", help="write into an existing file")
    p.add_argument(
        "--target-is-zero", action="store_true", help="with -n: the output reads as zeros"
    )
    p.add_argument(
        "-S",
        "--sparse-size",
        dest="sparse_size",
        default="4k",
        metavar="SIZE",
        help="zeros are left out in runs of at least SIZE (default 4k; 0: write every byte)",
    )
    p.add_argument(
        "-m", "--parallel", dest="parallel", default="8", metavar="N", help="1 to 16 (8)"
    )
    p.add_argument(
        "-W", "--oob-writes", dest="out_of_order", action="store_true", help="write out of order"
    )
    p.add_argument(
        "-l",
        "--source-snapshot",
        dest="snapshot",
        metavar="SNAPSHOT",
        help="copy this internal snapshot's disk (snapshot.name=N, snapshot.id=I or a name)",
        type=_snapshot_arg,
    )
    p.add_argument("--bitmaps", action="store_true", help="copy the persistent bitmaps too")
    p.add_argument(
        "--skip-broken-bitmaps",
        action="store_true",
        help="with --bitmaps: skip inconsistent bitmaps instead of failing",
    )
    from qcow2ovl._cli_options import add_force_share
    from qcow2ovl._cli_secrets import add_arguments

    add_force_share(p)
    add_arguments(p)
    p.add_argument(
        "--target-image-opts",
        dest="target_image_opts",
        action="store_true",
        help="with -n: OUTPUT is an options string (driver=qcow2,file.filename=...,...)",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="SOURCE OUTPUT")
    p.set_defaults(func=run)


__all__ = ["CACHE_MODES", "add_parser", "qcow2_options", "run"]
