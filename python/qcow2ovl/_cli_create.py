"""``qcow2ovl create``: qemu-img's ``create`` command line for qcow2 images.

``qcow2ovl create [-f qcow2] [-o key=value,...] [-b BACKING [-F FMT]] [-q] IMAGE [SIZE]``
takes qemu-img's option names and size syntax and prints its ``Formatting ...`` line. As
qemu-img does, it replaces an existing file (and an existing external data file); the Python
function :func:`qcow2ovl.create` refuses one unless ``overwrite=True``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from qcow2ovl.create import MAX_SIZE, _backing_size, _resolve, create

#: Multipliers of the size suffixes (case-insensitive), as qemu-img takes them.
_UNITS = {
    "b": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "p": 1 << 50,
    "e": 1 << 60,
}
_SIZE_RE = re.compile(r"(?P<int>\d*)(?:\.(?P<frac>\d*))?", re.ASCII)
_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")
#: Options qemu-img's qcow2 driver takes, in the order its ``Formatting`` line prints them,
#: with the value printed when the option is not given (None: not printed).
_PRINT_ORDER: tuple[tuple[str, str | None], ...] = (
    ("encrypt.format", None),
    ("encrypt.key-secret", None),
    ("encrypt.cipher-alg", None),
    ("encrypt.cipher-mode", None),
    ("encrypt.ivgen-alg", None),
    ("encrypt.ivgen-hash-alg", None),
    ("encrypt.hash-alg", None),
    ("encrypt.iter-time", None),
    ("cluster_size", "65536"),
    ("extended_l2", "off"),
    ("preallocation", None),
    ("compression_type", "zlib"),
    ("size", None),
    ("compat", None),
    ("backing_file", None),
    ("backing_fmt", None),
    ("data_file", None),
    ("data_file_raw", None),
    ("lazy_refcounts", "off"),
    ("refcount_bits", "16"),
)
_KNOWN = {name for name, _ in _PRINT_ORDER}
_SIZE_HELP = (
    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
    "and exabytes, respectively."
)


class CreateUsageError(ValueError):
    """An invalid command line; ``image`` says whether qemu-img would name the image."""

    def __init__(self, message: str, *, image: bool = True) -> None:
        super().__init__(message)
        self.image = image


def parse_size(text: str) -> int | None:
    """A size in qemu-img's syntax: an optional ``+``, then decimal (a fraction only with a
    unit) with an optional unit ``b k M G T P E`` (case-insensitive), or ``0x`` hex without a
    unit. None if it does not parse; sizes of 2**64 and above and negative sizes are returned
    as -1 (out of range)."""
    s = text.lstrip()
    if s.startswith("-"):
        return -1
    if s.startswith("+"):
        s = s[1:]  # a plus sign, as C's strtoull takes it (not followed by blanks or a sign)
        if not s or s[0].isspace() or s[0] in "+-":
            return None
    if s[:2].lower() == "0x":
        # Hexadecimal takes no suffix (every letter a-f is a digit: 0x5b is 91).
        if not re.fullmatch(r"0[xX][0-9a-fA-F]+", s):
            return None
        value = int(s, 16)
        return value if value < 2**64 else -1
    unit = 1
    if s and s[-1].lower() in _UNITS:
        unit = _UNITS[s[-1].lower()]
        s = s[:-1]
    m = _SIZE_RE.fullmatch(s)
    if not m or not s or s == ".":
        return None
    frac = m.group("frac") or ""
    if (m.group("int") or "") == "" and frac == "":
        return None
    whole = int(m.group("int") or "0")
    # The fraction is a C double, as QEMU reads it (15.99999999999999999999E is 16E), and its
    # bytes are rounded to the nearest, halves up (0.7k is 717 bytes).
    part = float(f"0.{frac}") if frac else 0.0
    if part and unit == 1:
        return None
    value = whole * unit + int(part * unit + 0.5)
    return value if value < 2**64 else -1


def _split_options(spec: str) -> list[tuple[str, str]]:
    """``key=value,key=value`` with ``,,`` standing for a comma inside a value."""
    items: list[tuple[str, str]] = []
    for part in spec.replace(",,", "\0").split(","):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise CreateUsageError(f"Invalid parameter '{key}'")
        items.append((key.replace("\0", ","), value.replace("\0", ",")))
    return items


def _bool(name: str, value: str) -> bool:
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise CreateUsageError(f"Parameter '{name}' expects 'on' or 'off'")


def _number(name: str, value: str) -> int:
    if not re.fullmatch(r"\d+|0[xX][0-9a-fA-F]+", value):
        raise CreateUsageError(f"Parameter '{name}' expects a number")
    return int(value, 0)


def _size_option(name: str, value: str) -> int:
    size = parse_size(value)
    if size is None or size < 0:
        raise CreateUsageError(
            f"Parameter '{name}' expects a non-negative number below 2^64\n{_SIZE_HELP}"
        )
    return size


def add_parser(subparsers: Any) -> None:
    """Add the ``create`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "create",
        help="create a qcow2 image (qemu-img create syntax)",
        description="Create a qcow2 image with qemu-img's options; an existing file is replaced, "
        "as qemu-img replaces it.",
    )
    p.add_argument("-f", dest="fmt", default="qcow2", help="image format (only qcow2)")
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="comma-separated key=value options, qemu-img's names (cluster_size, compat, ...)",
    )
    p.add_argument("-b", dest="backing_file", help="backing file")
    p.add_argument("-F", dest="backing_fmt", help="backing file format")
    p.add_argument("-q", dest="quiet", action="store_true", help="do not print the summary")
    from qcow2ovl._cli_secrets import add_arguments

    add_arguments(p, image_opts=False)
    p.add_argument("image", help="path of the new image")
    p.add_argument("size", nargs="?", help="virtual size, with optional suffix k M G T P E")
    p.set_defaults(func=run)


def _collect(args: argparse.Namespace) -> tuple[dict[str, str], int | None]:
    """The ``-o`` options (later ones win) with ``-b``/``-F`` merged in, and the size."""
    opts: dict[str, str] = {}
    for spec in args.options:
        for key, value in _split_options(spec):
            if key not in _KNOWN:
                raise CreateUsageError(f"Invalid parameter '{key}'")
            opts[key] = value
    if args.backing_file is not None:
        opts["backing_file"] = args.backing_file
    if args.backing_fmt is not None:
        opts["backing_fmt"] = args.backing_fmt
    size: int | None = None
    if args.size is not None:
        size = parse_size(args.size)
        if size is None:
            raise CreateUsageError(f"Invalid image size specified: '{args.size}'.", image=False)
        if not 0 <= size <= MAX_SIZE:
            raise CreateUsageError(
                f"Invalid image size specified. Must be between 0 and {MAX_SIZE}.", image=False
            )
        if "size" in opts:
            raise CreateUsageError("The image size must be specified only once")
    elif "size" in opts:
        size = _size_option("size", opts.pop("size"))
    opts.pop("size", None)
    return opts, size


def _formatting_line(image: str, opts: dict[str, str], size: int) -> str:
    shown = dict(opts)
    if "cluster_size" in shown:
        shown["cluster_size"] = str(_size_option("cluster_size", shown["cluster_size"]))
    shown["size"] = str(size)
    words = []
    for name, default in _PRINT_ORDER:
        value = shown.get(name, default)
        if value is not None:
            # Commas are doubled again, as in the -o syntax.
            words.append(f"{name}={value.replace(',', ',,')}")
    return f"Formatting '{image}', fmt=qcow2 " + " ".join(words)


def _create(args: argparse.Namespace) -> None:
    if args.fmt != "qcow2":
        raise CreateUsageError(f"Unknown file format '{args.fmt}'")
    opts, size = _collect(args)
    backing = opts.get("backing_file")
    backing_fmt = opts.get("backing_fmt")
    if backing is not None:
        if backing_fmt is None:
            raise CreateUsageError("Backing file specified without backing format")
        if size is None:
            size = _backing_size(_resolve(args.image, backing), backing_fmt)
    if size is None:
        raise CreateUsageError("Image creation needs a size parameter")
    # Parse every option before printing, as qemu-img does.
    kwargs: dict[str, Any] = {
        "cluster_size": _size_option("cluster_size", opts.get("cluster_size", "65536")),
        "version": opts.get("compat", 3),
        "refcount_bits": _number("refcount_bits", opts.get("refcount_bits", "16")),
        "extended_l2": _bool("extended_l2", opts.get("extended_l2", "off")),
        "lazy_refcounts": _bool("lazy_refcounts", opts.get("lazy_refcounts", "off")),
        "compression_type": opts.get("compression_type", "zlib"),
        "backing_file": backing,
        "backing_format": backing_fmt,
        "data_file": opts.get("data_file"),
        "data_file_raw": _bool("data_file_raw", opts.get("data_file_raw", "off")),
        "preallocation": opts.get("preallocation", "off"),
        "encrypt": _encrypt(args, opts),
    }
    if not args.quiet:
        print(_formatting_line(args.image, opts, size), flush=True)
    # An existing image (and data file) is replaced, as qemu-img create replaces it.
    create(args.image, size, overwrite=True, **kwargs)


def _encrypt(args: argparse.Namespace, opts: dict[str, str]) -> dict[str, object] | None:
    """:func:`qcow2ovl.create`'s *encrypt* from the ``encrypt.*`` options (``None`` without
    any)."""
    given = {k: v for k, v in opts.items() if k.startswith("encrypt.")}
    return encrypt_options(args.objects, given) if given else None


def encrypt_options(objects: list[str], given: dict[str, str]) -> dict[str, object]:
    """:func:`qcow2ovl.create`'s *encrypt* from ``encrypt.*`` options, the secret looked up
    among the ``--object`` definitions *objects*; errors in qemu-img's words."""
    from qcow2ovl._cli_secrets import OptionsError, secret_by_id, secrets

    rest = {k.removeprefix("encrypt."): v for k, v in given.items()}
    try:
        found = secrets(objects)
    except OptionsError as exc:
        raise CreateUsageError(str(exc), image=False) from None
    fmt = rest.pop("format", None)
    if fmt is None:
        raise CreateUsageError("Parameter 'encrypt.format' is missing")
    encrypt: dict[str, object] = {"format": fmt}
    ident = rest.pop("key-secret", None)
    if ident is not None:
        try:
            encrypt["key_secret"] = secret_by_id(found, ident)
        except OptionsError as exc:
            raise CreateUsageError(str(exc)) from None
    iter_time = rest.pop("iter-time", None)
    if iter_time is not None:
        encrypt["iter_time"] = _number("encrypt.iter-time", iter_time)
    for key, value in rest.items():
        encrypt[key.replace("-", "_")] = value
    return encrypt


def _data_files(args: argparse.Namespace) -> list[str]:
    """The ``data_file`` names of the ``-o`` options (for error messages)."""
    try:
        return [v for spec in args.options for k, v in _split_options(spec) if k == "data_file"]
    except CreateUsageError:
        return []


def run(args: argparse.Namespace) -> int:
    """Run ``qcow2ovl create``; errors are printed the way qemu-img prints them. Returns the
    exit status."""
    try:
        _create(args)
    except CreateUsageError as exc:
        where = f"{args.image}: " if exc.image else ""
        print(f"qcow2ovl: {where}{exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        from qcow2ovl.errors import LockError

        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if isinstance(exc, LockError):
            pass  # QEMU's two lines, naming the locked file, as qemu-img prints them
        elif isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
            name = os.fsdecode(exc.filename)
            if name == args.image or name in _data_files(args):
                text = f"Could not create '{name}': {exc.strerror}"  # qemu-img's words
        print(f"qcow2ovl: {args.image}: {text}", file=sys.stderr)
        return 1
    return 0
