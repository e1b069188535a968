"""``qcow2ovl measure``: qemu-img measure's command line over :func:`qcow2ovl.measure`."""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any

#: The type qemu-img checks each ``-o`` value against, per output format: the format's own
#: creation options, then those of the file it would be written to.
_FILE_OPTIONS = {"preallocation": "text", "nocow": "bool", "extent_size_hint": "size"}
_OPTION_TYPES: dict[str, dict[str, str]] = {
    "qcow2": {
        "size": "size",
        "compat": "text",
        "backing_file": "text",
        "backing_fmt": "text",
        "data_file": "text",
        "data_file_raw": "bool",
        "encrypt": "bool",
        "cluster_size": "size",
        "lazy_refcounts": "bool",
        "refcount_bits": "number",
        "compression_type": "text",
        "extended_l2": "bool",
        **_FILE_OPTIONS,
    },
    "raw": {"size": "size", **_FILE_OPTIONS},
}
#: ``-o`` names passed on to measure() (qcow2 output), with its keyword for each.
_PASSED = {
    "cluster_size": "cluster_size",
    "compat": "version",
    "refcount_bits": "refcount_bits",
    "extended_l2": "extended_l2",
    "preallocation": "preallocation",
    "backing_file": "backing_file",
    "backing_fmt": "backing_format",
    "lazy_refcounts": "lazy_refcounts",
    "compression_type": "compression_type",
    "data_file": "data_file",
    "data_file_raw": "data_file_raw",
}


class _OptionError(ValueError):
    """A ``-o`` value qemu-img refuses while parsing: printed with its second line."""


def _parse_options(specs: list[str], fmt: str) -> dict[str, Any]:
    """measure()'s options from ``-o key=value,...`` for output *fmt*, checked in order as
    qemu-img checks them (later values win)."""
    from qcow2ovl import _cli_create as c

    types = _OPTION_TYPES[fmt]
    values: dict[str, Any] = {}
    try:
        for key, value in c._split_options(",".join(specs)):
            kind = types.get(key) or ("text" if key.startswith("encrypt.") else None)
            if kind is None or (key.startswith("encrypt.") and fmt != "qcow2"):
                raise _OptionError(f"Invalid parameter '{key}'")
            if kind == "bool":
                values[key] = c._bool(key, value)
            elif kind == "size":
                values[key] = c._size_option(key, value)
            elif kind == "number":
                values[key] = c._number(key, value)
            else:
                values[key] = value
    except c.CreateUsageError as exc:
        raise _OptionError(str(exc)) from None
    if fmt != "qcow2":
        return {}
    for key in values:
        if key == "encrypt" or key.startswith("encrypt."):
            raise ValueError(f"measure: option '{key}' is not supported (encryption)")
    return {_PASSED[k]: v for k, v in values.items() if k in _PASSED}


def _size(text: str) -> int:
    from qcow2ovl._cli_create import parse_size

    size = parse_size(text)
    if size is None:
        raise ValueError(f"Invalid image size specified: '{text}'.")
    if not 0 <= size <= 2**63 - 1:
        raise ValueError(f"Invalid image size specified. Must be between 0 and {2**63 - 1}.")
    return size


def run(args: argparse.Namespace) -> int:
    """Run ``qcow2ovl measure``: qemu-img's output, exit status 0 (1 on an error)."""
    from qcow2ovl.errors import SnapshotNotFoundError
    from qcow2ovl.measure import _OTHER_FORMATS, FORMATS, _unknown_format, measure

    size = _size(args.size) if args.size is not None else None
    if len(args.files) > 1:
        raise ValueError("At most one filename argument is allowed.")
    filename = args.files[0] if args.files else None
    if filename is None and (args.source_format is not None or args.snapshot is not None):
        raise ValueError("--image-opts, -f, and -l require a filename argument.")
    if filename is not None and size is not None:
        raise ValueError("--size N cannot be used together with a filename.")
    if filename is None and size is None:
        raise ValueError("Either --size N or one filename must be specified.")
    if filename is not None:
        # As qemu-img: the source is opened before the output format and options are looked
        # at, so a missing file is the error reported first.
        with open(filename, "rb"):
            pass
        fmt = args.source_format
        if fmt is not None and fmt not in FORMATS:
            if fmt in _OTHER_FORMATS:
                raise _unknown_format(fmt, "source")
            raise ValueError(f"Could not open '{filename}': Unknown driver '{fmt}'")
    if args.output_format not in FORMATS:
        raise _unknown_format(args.output_format, "output")
    try:
        options = _parse_options(args.options, args.output_format)
    except _OptionError as exc:
        print(f"qcow2ovl: {exc}", file=sys.stderr)
        print(f"qcow2ovl: Invalid options for file format '{args.output_format}'", file=sys.stderr)
        return 1
    try:
        result = measure(
            filename,
            size=size,
            source_format=args.source_format,
            output_format=args.output_format,
            options=options,
            snapshot=args.snapshot,
            force_share=args.force_share,
        )
    except SnapshotNotFoundError:
        raise ValueError("Failed to load snapshot: Can't find snapshot") from None
    if args.output == "json":
        import json

        print(json.dumps(result.as_json(), indent=4))
    else:
        print(result.human())
    return 0


HELP = (
    "Calculate the file size a new image needs, as 'qemu-img measure' does: for a disk of "
    "--size bytes, or to hold a copy of IMAGE (qcow2, with its backing chain, or raw). The "
    "output format is raw unless -O qcow2; -o takes qemu-img's qcow2 creation options "
    "(cluster_size, refcount_bits, extended_l2, compat, preallocation, backing_file, ...)."
)


def add_parser(sub: Any) -> None:
    """Adds ``measure`` to the command's subparsers."""
    from qcow2ovl._cli_convert import _snapshot_arg
    from qcow2ovl._cli_options import add_force_share

    p = sub.add_parser(
        "measure", help="file size a new image needs (qemu-img measure)", description=HELP
    )
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument(
        "-O", "--target-format", dest="output_format", default="raw", help="raw or qcow2"
    )
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="output options, key=value,... (qemu-img create's names)",
    )
    p.add_argument("-f", "--format", dest="source_format", help="IMAGE's format (probed)")
    p.add_argument(
        "-l",
        "--snapshot",
        dest="snapshot",
        metavar="SNAPSHOT",
        type=_snapshot_arg,
        help="measure this internal snapshot's disk (snapshot.name=N, snapshot.id=I or a name)",
    )
    p.add_argument("-s", "--size", dest="size", metavar="SIZE", help="a disk of this size")
    add_force_share(p)
    p.add_argument("files", nargs="*", metavar="IMAGE", help="the image to copy")
    from qcow2ovl._cli_secrets import add_metadata_arguments

    add_metadata_arguments(p, "files")
    p.set_defaults(func=run)


__all__ = ["add_parser", "run"]
