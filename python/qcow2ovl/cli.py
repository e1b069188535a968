"""The ``qcow2ovl`` command line (also ``python -m qcow2ovl``)."""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from types import SimpleNamespace

# Startup time matters here (``qcow2ovl info`` should cost little more than starting Python), so
# modules are imported where they are needed: argparse in ``main``, json only for JSON output,
# the demo's modules only by the demo.


def _info(args: argparse.Namespace) -> int:
    from qcow2ovl import _cli_info

    return _cli_info.run(args)


def _map(args: argparse.Namespace) -> int:
    if getattr(args, "picture", None):
        from qcow2ovl import picture

        picture.write_picture(args.image, args.picture, args.overlap_check)
    if getattr(args, "guest", False):
        from qcow2ovl import _cli_guest

        return _cli_guest.guest_map(args)
    from qcow2ovl import _format
    from qcow2ovl.image import _open

    with _open(
        args.image,
        overlap_check=args.overlap_check,
        force_share=args.force_share,
        metadata_only=True,
    ) as image:
        extents = image.metadata_extents()
    if args.output == "json":
        import json

        # Streamed one record at a time: an image can have millions of metadata extents.
        out = sys.stdout
        out.write("[")
        for i, extent in enumerate(extents):
            record = _format.map_records([extent])[0]
            out.write((",\n" if i else "\n") + json.dumps(record))
        out.write("\n]\n" if len(extents) else "]\n")
    else:
        print(_format.map_text(extents))
    return 0


def _demo(_args: argparse.Namespace) -> int:
    from qcow2ovl import _demo

    return _demo.run()


_DEMO_HELP = (
    "show what qcow2ovl does: create an image with qcow2ovl's own engine, damage one L2 entry "
    "so that the next guest write would land on the L1 table, and show that write refused (and "
    "the image marked corrupt, its metadata intact) next to QEMU with overlap-check=none "
    "destroying a copy; then have QEMU build a small image with snapshots and a bitmap (when "
    "qemu-img and qemu-io are installed), print its info, its metadata map and a few pre-write "
    "checks; then map a synthetic 1 TiB image with 16 snapshots and time checks against it next "
    "to QEMU's naive algorithm"
)

USAGE = """\
usage: qcow2ovl [--version] [-h] COMMAND ...

commands:
  info IMAGE   header facts, snapshots and bitmaps (like qemu-img info)
  map IMAGE    every metadata extent of the host file (--picture FILE.svg draws it)
  check IMAGE  refcounts and metadata as qemu-img check, with overlaps named
  inspect      a verdict on an untrusted file: backing or data file, overlaps, ...
  demo         a guarded write next to QEMU's unguarded one; maps and checks
  create       create a qcow2 image (qemu-img create syntax)
  convert      copy a disk to qcow2 or raw (qemu-img convert syntax)
  resize       grow or shrink a qcow2 image or a raw file (qemu-img resize syntax)
  commit       fold an overlay into its backing file (qemu-img commit syntax)
  rebase       point an image at another backing file (qemu-img rebase syntax)
  serve        serve an image over NBD, every write guarded (qemu-nbd syntax)
  measure      the file size a new image needs (qemu-img measure syntax)
  compare      whether two disks hold the same bytes (qemu-img compare syntax)
  io IMAGE     qemu-io's commands: read, write, alloc, map, ... (qemu-io -c syntax)
  snapshot     list, create, apply or delete internal snapshots (qemu-img snapshot syntax)
  bitmap       add, remove, clear, enable, disable or merge bitmaps (qemu-img bitmap syntax)
  fleet check  check many images on a process pool or a Dask cluster

Run 'qcow2ovl COMMAND --help' for a command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``qcow2ovl`` command."""
    import argparse

    from qcow2ovl import __version__

    class SubcommandParser(argparse.ArgumentParser):
        """A subcommand's parser: an option it does not know is an error with the subcommand's
        usage (argparse would otherwise hand it up to the top-level parser, which reports it
        with the top-level usage after the subcommand took the following words as operands)."""

        def parse_known_args(  # type: ignore[override]
            self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
        ) -> tuple[argparse.Namespace, list[str]]:
            parsed, extras = super().parse_known_args(args, namespace)
            if extras:
                self.error("unrecognized arguments: " + " ".join(extras))
            return parsed, extras

    parser = argparse.ArgumentParser(
        prog="qcow2ovl",
        description="qcow2 metadata maps and constant-time metadata overlap checks",
    )
    parser.add_argument("--version", action="version", version=f"qcow2ovl {__version__}")
    from qcow2ovl import _cli_options, _cli_secrets

    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=SubcommandParser
    )
    demo = sub.add_parser(
        "demo",
        help="a guarded write next to QEMU's unguarded one; maps and checks",
        description=_DEMO_HELP,
    )
    demo.set_defaults(func=_demo)
    for name, func, text in (
        ("info", _info, "header facts, snapshots and bitmaps (like qemu-img info)"),
        ("map", _map, "every metadata extent of the host file"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("image", help="path of the qcow2 image (opened read-only)")
        p.add_argument("--output", choices=("human", "json"), default="human")
        p.add_argument(
            "--overlap-check",
            default="all",
            help="which metadata types to map (QEMU's overlap-check syntax; default: all)",
        )
        if name == "info":
            p.add_argument(
                "--backing-chain",
                action="store_true",
                help="also every image of the backing chain (JSON: a list), as qemu-img does",
            )
        if name == "map":
            p.add_argument(
                "--guest",
                action="store_true",
                help="map the guest disk instead, as `qemu-img map` does",
            )
            p.add_argument("--picture", metavar="FILE.svg", help="also draw the layout as SVG")
        _cli_options.add_force_share(p)
        p.add_argument(
            "--snapshot",
            metavar="NAME_OR_ID",
            help="look at this internal snapshot's disk (guest size and map) instead of the "
            "active one",
        )
        _cli_secrets.add_metadata_arguments(p)
        p.set_defaults(func=func)
    from qcow2ovl import (
        _cli_bitmap,
        _cli_check,
        _cli_commit,
        _cli_compare,
        _cli_convert,
        _cli_create,
        _cli_fleet,
        _cli_inspect,
        _cli_io,
        _cli_measure,
        _cli_rebase,
        _cli_resize,
        _cli_serve,
        _cli_snapshot,
    )

    _cli_check.add_parser(sub)
    _cli_fleet.add_parser(sub)
    _cli_snapshot.add_parser(sub)
    _cli_bitmap.add_parser(sub)
    _cli_inspect.add_parser(sub)
    _cli_create.add_parser(sub)
    _cli_io.add_parser(sub)
    _cli_convert.add_parser(sub)
    _cli_measure.add_parser(sub)
    _cli_compare.add_parser(sub)
    _cli_resize.add_parser(sub)
    _cli_commit.add_parser(sub)
    _cli_rebase.add_parser(sub)
    _cli_serve.add_parser(sub)
    return parser


_COMMANDS = {"info": _info, "map": _map}
_OPTIONS = {"--output": "output", "--overlap-check": "overlap_check"}


def fast_parse(argv: Sequence[str]) -> SimpleNamespace | None:
    """The plain forms of ``info``/``map`` (``COMMAND IMAGE [--output X] [--overlap-check Y]``,
    ``info``'s ``--backing-chain``;
    options also as ``--opt=value``), parsed without building the argparse parser, which costs a
    few milliseconds of a command that should start in about the time Python does.

    Returns None for anything else (help, abbreviations, errors, other commands): that goes to
    :func:`build_parser`, which gives the same result for every form accepted here (tested).
    """
    if not argv or argv[0] not in _COMMANDS:
        return None
    values: dict[str, object] = {"output": "human", "overlap_check": "all"}
    image = None
    rest = list(argv[1:])
    while rest:
        token = rest.pop(0)
        name, eq, value = token.partition("=")
        if token == "--backing-chain" and argv[0] == "info":
            values["backing_chain"] = True
        elif name in _OPTIONS:
            if not eq:
                if not rest or rest[0].startswith("-"):
                    return None
                value = rest.pop(0)
            values[_OPTIONS[name]] = value
        elif token.startswith("-") or image is not None:
            return None
        else:
            image = token
    if image is None or values["output"] not in ("human", "json"):
        return None
    from types import SimpleNamespace

    values["snapshot"] = None
    values["force_share"] = False
    # What `_cli_secrets.add_metadata_arguments` gives the parsed forms (no --object here).
    values["objects"] = []
    values["image_opts"] = False
    values["metadata_image_opts"] = "image"
    if argv[0] == "info":
        values.setdefault("backing_chain", False)
    if argv[0] == "map":
        values["guest"] = False
        values["picture"] = None
    return SimpleNamespace(command=argv[0], image=image, func=_COMMANDS[argv[0]], **values)


def lock_message(args: object, exc: BaseException) -> str:
    """A lock conflict as qemu-img prints it: ``Could not open 'IMAGE': `` before QEMU's two
    lines (``IMAGE: `` for the image being created; for commands of several files, the file
    the lock is on)."""
    image = (
        getattr(args, "output_image", None)
        or getattr(args, "image", None)
        or getattr(exc, "filename", None)
    )
    if getattr(args, "command", None) == "create":
        return f"{image}: {exc}"
    return f"Could not open '{image}': {exc}" if image else str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args_list = sys.argv[1:] if argv is None else list(argv)
    if not args_list:
        print(USAGE, end="")
        return 2
    args = fast_parse(args_list) or build_parser().parse_args(args_list)
    from qcow2ovl.errors import LockError, Qcow2Error

    if getattr(args, "metadata_image_opts", False) and (args.image_opts or args.objects):
        # (Imported only then: plain `info` and `map` start in about the time Python does.)
        from qcow2ovl._cli_secrets import OptionsError, resolve_metadata_image

        try:
            resolve_metadata_image(args)
        except OptionsError as exc:
            print(f"qcow2ovl: {exc}", file=sys.stderr)
            return 1

    try:
        return int(args.func(args))
    except BrokenPipeError:
        # The reader went away (``| head``): not an error worth a message.
        sys.stderr.close()
        return 0
    except LockError as exc:
        print(f"qcow2ovl: {lock_message(args, exc)}", file=sys.stderr)
        return 1
    except (Qcow2Error, OSError, ValueError) as exc:
        print(f"qcow2ovl: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
