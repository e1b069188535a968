"""Secrets and image options on the command line, in qemu-img's syntax and words.

- ``--object secret,id=ID,data=TEXT`` or ``--object secret,id=ID,file=PATH`` (optionally
  ``format=base64``) defines a secret; the file's bytes are the secret as they are, a trailing
  newline included, as QEMU reads them.
- ``--image-opts`` makes the image argument an options string:
  ``driver=qcow2,file.filename=PATH,encrypt.key-secret=ID`` (``,,`` is a literal comma).
- ``-o encrypt.key-secret=ID`` names the secret of a new encrypted image (``create``).

Secrets are held as bytes only as long as a command needs them and never printed.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field

# Startup time: typing is for type checkers only (see qcow2ovl.image).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


class OptionsError(ValueError):
    """An ``--object`` or ``--image-opts`` string qemu-img would refuse, in its words."""


def split_options(text: str) -> list[tuple[str, str | None]]:
    """QEMU's option syntax: ``key=value`` items separated by commas, ``,,`` a literal comma.
    An item without ``=`` has the value ``None``."""
    items: list[tuple[str, str | None]] = []
    current: list[str] = []
    i = 0
    while i <= len(text):
        if i == len(text) or (text[i] == "," and text[i + 1 : i + 2] != ","):
            item = "".join(current)
            key, eq, value = item.partition("=")
            items.append((key, value if eq else None))
            current = []
        elif text[i] == ",":
            current.append(",")
            i += 1  # the second comma of ",,"
        else:
            current.append(text[i])
        i += 1
    return items


def escape(value: str) -> str:
    """*value* as one item of an options string (commas doubled)."""
    return value.replace(",", ",,")


def parse_secret_object(spec: str) -> tuple[str, bytes]:
    """``(id, secret bytes)`` of one ``--object`` definition."""
    items = split_options(spec)
    opts: dict[str, str] = {}
    qom_type = None
    for n, (key, value) in enumerate(items):
        if n == 0 and value is None:
            qom_type = key
        elif key == "qom-type" and value is not None:
            qom_type = value
        elif value is not None:
            opts[key] = value
        else:
            raise OptionsError(f"Invalid parameter '{key}'")
    if qom_type is None:
        raise OptionsError("Parameter 'qom-type' is missing")
    if qom_type != "secret":
        raise OptionsError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
    ident = opts.pop("id", None)
    if ident is None:
        raise OptionsError("Parameter 'id' is missing")
    data, path = opts.pop("data", None), opts.pop("file", None)
    fmt = opts.pop("format", "raw")
    if "keyid" in opts:
        raise OptionsError("secret: 'keyid' (a secret encrypted by another) is not supported")
    opts.pop("iv", None)
    if opts:
        raise OptionsError(f"Parameter '{next(iter(opts))}' is unexpected")
    if fmt not in ("raw", "base64"):
        raise OptionsError(f"Parameter 'format' does not accept value '{fmt}'")
    if data is not None and path is not None:
        raise OptionsError("'file' and 'data' are mutually exclusive")
    if data is None and path is None:
        raise OptionsError("Either 'file' or 'data' must be provided")
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise OptionsError(
                f"Unable to read {path}: Failed to open file \u201c{path}\u201d: "
                f"{exc.strerror or exc}"
            ) from None
    else:
        raw = (data or "").encode()
    if fmt == "base64":
        try:
            raw = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise OptionsError("Base64 data contains invalid characters") from None
    return ident, raw


def secrets(objects: list[str]) -> dict[str, bytes]:
    """The secrets the ``--object`` options define, by id."""
    found: dict[str, bytes] = {}
    for spec in objects:
        ident, value = parse_secret_object(spec)
        if ident in found:
            raise OptionsError(
                f"attempt to add duplicate property '{ident}' to object (type 'container')"
            )
        found[ident] = value
    return found


def secret_by_id(found: dict[str, bytes], ident: str) -> bytes:
    """The secret *ident*, or QEMU's error."""
    if ident not in found:
        raise OptionsError(f"No secret with id '{ident}'")
    return found[ident]


@dataclass
class ImageOpts:
    """What an ``--image-opts`` string (or a plain file name) asks for."""

    #: The image's file.
    filename: str
    #: The driver (``qcow2`` or ``raw``).
    driver: str = "qcow2"
    #: The secret that unlocks it, when one was named.
    secret: bytes | None = field(default=None, repr=False)


#: ``--image-opts`` keys understood besides the driver, file name and secret.
_IGNORED_KEYS = frozenset({"file.driver", "file.locking", "node-name"})


def image_opts(spec: str, found: dict[str, bytes], *, lookup: bool = True) -> ImageOpts:
    """The image an ``--image-opts`` string names, with its secret looked up in *found*
    (unless not *lookup*: then an unknown secret is no error, and none is given)."""
    opts: dict[str, str | None] = {}
    for key, value in split_options(spec):
        if value is None:
            raise OptionsError(f"Invalid parameter '{key}'")
        opts[key] = value
    # Without a driver QEMU probes the format; qcow2 is the one this engine opens.
    driver = opts.pop("driver", None) or "qcow2"
    if driver not in ("qcow2", "raw"):
        raise OptionsError(f"Unknown driver '{driver}'")
    filename = opts.pop("file.filename", None) or opts.pop("file", None)
    if filename is None:
        raise OptionsError('A block device must be specified for "file"')
    secret_id = opts.pop("encrypt.key-secret", None)
    for name in list(opts):
        if name in _IGNORED_KEYS:
            opts.pop(name)
    if opts:
        raise OptionsError(
            f"Block format '{driver}' does not support the option '{next(iter(opts))}'"
        )
    secret = secret_by_id(found, secret_id) if secret_id is not None and lookup else None
    return ImageOpts(filename=filename, driver=driver, secret=secret)


def add_arguments(p: argparse.ArgumentParser, *, image_opts: bool = True) -> None:
    """``--object`` (and ``--image-opts``) on a subcommand's parser."""
    p.add_argument(
        "--object",
        dest="objects",
        action="append",
        default=[],
        metavar="OBJECTDEF",
        help="define a secret: secret,id=ID,data=TEXT or secret,id=ID,file=PATH[,format=base64]",
    )
    if image_opts:
        p.add_argument(
            "--image-opts",
            dest="image_opts",
            action="store_true",
            help="the image argument is an options string: "
            "driver=qcow2,file.filename=PATH,encrypt.key-secret=ID",
        )


def add_metadata_arguments(p: argparse.ArgumentParser, dest: str = "image") -> None:
    """``--object`` and ``--image-opts`` on a command that reads metadata only (``info``,
    ``map``, ``check``, ``snapshot``, ``resize``, ``bitmap``, ``measure``, ``rebase``):
    accepted as qemu-img accepts them, the image argument (attribute *dest*, or the first of
    that list) resolved to its file before the command runs; no secret is needed."""
    add_arguments(p)
    p.set_defaults(metadata_image_opts=dest)


def resolve_metadata_image(args: Any) -> None:
    """Replaces the image argument of a command of `add_metadata_arguments` by the file it
    names. Raises `OptionsError` in qemu-img's words: an options string it cannot open is named
    (``Could not open 'SPEC': ...``), but for ``info``, which opens no guest data and so looks
    up no secret (an unknown one is no error there, as in qemu-img)."""
    found = secrets(args.objects)
    dest = args.metadata_image_opts
    value = getattr(args, dest)
    spec = value[0] if isinstance(value, list) and value else value
    if not args.image_opts or not isinstance(spec, str):
        return
    try:
        filename = image_opts(spec, found, lookup=args.command != "info").filename
    except OptionsError as exc:
        raise OptionsError(f"Could not open '{spec}': {exc}") from None
    if isinstance(value, list):
        value[0] = filename
    else:
        setattr(args, dest, filename)


def resolve(args: Any, image: str) -> ImageOpts:
    """The image a command line names: *image* itself, or the options string it is when
    ``--image-opts`` was given."""
    found = secrets(getattr(args, "objects", []) or [])
    if getattr(args, "image_opts", False):
        return image_opts(image, found)
    return ImageOpts(filename=os.fspath(image))
