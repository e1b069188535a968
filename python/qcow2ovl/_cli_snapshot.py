"""``qcow2ovl snapshot``: qemu-img's ``snapshot`` command for internal snapshots.

``qcow2ovl snapshot [-l | -c NAME | -a NAME | -d NAME] [-q] IMAGE`` lists (the default),
creates, applies or deletes, with qemu-img's listing and error messages. ``-a`` finds a
snapshot by id first, then by name; ``-d`` by name only (both as qemu-img does). Every write
goes through the guarded engine.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any

_HELP = "list, create, apply or delete internal snapshots (qemu-img snapshot syntax)"
#: The action flags, with qemu-img's words for a failure of each.
_ACTIONS = {"create": "create", "apply": "apply", "delete": "delete"}


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``snapshot`` command to the ``qcow2ovl`` parser."""
    p = sub.add_parser("snapshot", help=_HELP, description=_HELP)
    from qcow2ovl._cli_secrets import add_metadata_arguments

    add_metadata_arguments(p)
    p.add_argument("image", help="path of the qcow2 image")
    p.add_argument("-l", dest="list", action="store_true", help="list the snapshots (default)")
    p.add_argument("-c", dest="create", metavar="NAME", help="create a snapshot named NAME")
    p.add_argument("-a", dest="apply", metavar="NAME", help="revert the disk to a snapshot")
    p.add_argument("-d", dest="delete", metavar="NAME", help="delete a snapshot")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet mode")
    from qcow2ovl._cli_options import add_force_share

    add_force_share(p)
    p.add_argument(
        "--overlap-check",
        default="all",
        help="which metadata types guard the writes (QEMU's overlap-check syntax; default: all)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``qcow2ovl snapshot``; 0 on success, 1 on failure (as qemu-img)."""
    from qcow2ovl.errors import Qcow2Error, SnapshotNotFoundError
    from qcow2ovl.image import open as open_image

    chosen = [a for a in ("create", "apply", "delete") if getattr(args, a) is not None]
    if len(chosen) + bool(args.list) > 1:
        print("qcow2ovl: snapshot: Cannot mix '-l', '-a', '-c', '-d'", file=sys.stderr)
        return 1
    if not chosen:
        from qcow2ovl._format import snapshot_list_lines

        with open_image(args.image, overlap_check="none", force_share=args.force_share) as image:
            lines = snapshot_list_lines(image.snapshots)
        if lines and not args.quiet:
            print("\n".join(lines))
        return 0
    action = chosen[0]
    name: str = getattr(args, action)
    from qcow2ovl._cli_options import refuse_force_share

    refuse_force_share(args)
    with open_image(args.image, writable=True, overlap_check=args.overlap_check) as image:
        try:
            if action == "delete":
                # qemu-img deletes by name only; the id then names that very snapshot.
                found = [s.id for s in image.snapshots if s.name == name]
                if not found:
                    raise SnapshotNotFoundError(f"Can't find snapshot '{name}'")
                name_or_id = found[0]
            else:
                name_or_id = name
            if action == "create":
                image.create_snapshot(name_or_id)
            elif action == "apply":
                image.apply_snapshot(name_or_id)
            else:
                image.delete_snapshot(name_or_id)
        except (Qcow2Error, OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if isinstance(exc, SnapshotNotFoundError):
                reason = "snapshot not found"
            print(
                f"qcow2ovl: Could not {_ACTIONS[action]} snapshot '{name}': {reason}",
                file=sys.stderr,
            )
            return 1
    return 0
