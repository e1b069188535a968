"""``qcow2ovl bitmap``: qemu-img's ``bitmap`` command for persistent dirty bitmaps.

``qcow2ovl bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
[-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] IMAGE BITMAP`` runs the actions in the order
given, as qemu-img does: ``--add`` adds BITMAP (disabled when ``--disable`` is given anywhere,
with ``-g`` bytes per bit), ``--merge SOURCE`` marks in BITMAP what bitmap SOURCE marks (of
SOURCE_FILE with ``-b``). The first failure stops the rest with qemu-img's message and exit
status 1; what the actions before it did is stored, as qemu-img stores it.
"""

from __future__ import annotations

import argparse

from qcow2ovl._cli_errors import fail as _fail

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_HELP = "add, remove, clear, enable, disable or merge persistent bitmaps (qemu-img bitmap syntax)"


class _Act(argparse.Action):
    """Appends ``(action, value)`` to ``namespace.actions``, keeping the order given."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        actions = list(getattr(namespace, "actions", None) or [])
        actions.append((self.dest, values))
        namespace.actions = actions


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``bitmap`` command to the ``qcow2ovl`` parser."""
    p = sub.add_parser("bitmap", help=_HELP, description=_HELP)
    for name, what in (
        ("add", "add BITMAP"),
        ("remove", "remove BITMAP"),
        ("clear", "clear every bit of BITMAP"),
        ("enable", "let writes mark BITMAP"),
        ("disable", "stop writes marking BITMAP (with --add: add it disabled)"),
    ):
        p.add_argument(f"--{name}", dest=name, nargs=0, action=_Act, help=what)
    p.add_argument(
        "--merge", dest="merge", metavar="SOURCE", action=_Act, help="merge bitmap SOURCE in"
    )
    p.add_argument(
        "-b", dest="source_file", metavar="SOURCE_FILE", help="image of --merge's SOURCE"
    )
    p.add_argument("-F", dest="source_format", metavar="SOURCE_FMT", help="format of SOURCE_FILE")
    p.add_argument("-g", dest="granularity", metavar="GRANULARITY", help="bytes per bit (--add)")
    p.add_argument("-f", dest="format", default="qcow2", help="format of IMAGE (qcow2)")
    p.add_argument(
        "--overlap-check",
        default="all",
        help="which metadata types guard the writes (QEMU's overlap-check syntax; default: all)",
    )
    p.add_argument("operands", nargs="*", metavar="IMAGE BITMAP")
    from qcow2ovl._cli_secrets import add_metadata_arguments

    add_metadata_arguments(p, "operands")
    p.set_defaults(func=run, actions=[])


def run(args: argparse.Namespace) -> int:
    """Run ``qcow2ovl bitmap``; 0 on success, 1 on any failure (as qemu-img)."""
    actions: list[tuple[str, Any]] = args.actions
    kinds = {kind for kind, _ in actions}
    if not actions:
        return _fail(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge"
        )
    if args.granularity is not None and "add" not in kinds:
        return _fail("granularity only supported with --add")
    if args.source_format is not None and args.source_file is None:
        return _fail("-F only supported with -b")
    if args.source_file is not None and "merge" not in kinds:
        return _fail("Merge bitmap source file only supported with --merge")
    if len(args.operands) != 2:
        return _fail("Expecting filename and bitmap name")
    granularity = None
    if args.granularity is not None:
        from qcow2ovl._cli_create import parse_size

        granularity = parse_size(args.granularity)
        if granularity is None or granularity < 0:
            return _fail(f"Invalid granularity specified: '{args.granularity}'.")
    image_path, name = args.operands
    from qcow2ovl.errors import Qcow2Error
    from qcow2ovl.image import open as open_image

    source = None
    if args.source_file is not None and args.source_format in (None, "qcow2"):
        source = open_image(args.source_file, overlap_check="none")
    try:
        with open_image(image_path, writable=True, overlap_check=args.overlap_check) as image:
            for kind, value in actions:
                try:
                    if args.format != "qcow2":
                        raise Qcow2Error(
                            f"Can't store persistent bitmaps to '{image_path}': Operation not "
                            "supported"
                        )
                    _act(image, kind, value, name, granularity, "disable" in kinds, args, source)
                except (Qcow2Error, ValueError) as exc:
                    return _fail(f"Operation {kind} on bitmap {name} failed: {exc}")
    finally:
        if source is not None:
            source.close()
    return 0


def _act(
    image: Any,
    kind: str,
    value: Any,
    name: str,
    granularity: int | None,
    add_disabled: bool,
    args: argparse.Namespace,
    source: Any,
) -> None:
    """One action of the list on *image*."""
    from qcow2ovl.errors import BitmapError

    if kind == "add":
        image.add_bitmap(name, granularity=granularity, enabled=not add_disabled)
    elif kind == "remove":
        image.remove_bitmap(name)
    elif kind == "clear":
        image.clear_bitmap(name)
    elif kind == "enable":
        image.enable_bitmap(name)
    elif kind == "disable":
        image.disable_bitmap(name)
    elif args.source_file is not None and source is None:
        # A source of another format has no bitmaps at all.
        raise BitmapError(f"Dirty bitmap '{value}' not found")
    else:
        image.merge_bitmap(name, value, source_image=source)
