"""Options that several ``qcow2ovl`` commands share, spelled as qemu-img spells them."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

_FORCE_SHARE_HELP = (
    "open the image with shared permissions (qemu-img's -U): no lock is refused, but the "
    "image may change under the command while another process writes it"
)


def add_force_share(parser: argparse.ArgumentParser) -> None:
    """``-U``/``--force-share``, for commands that only read."""
    parser.add_argument(
        "-U", "--force-share", dest="force_share", action="store_true", help=_FORCE_SHARE_HELP
    )


def refuse_force_share(args: argparse.Namespace) -> None:
    """``-U`` on a command that writes: refused before anything is opened, as qemu-img words it
    (the Python API raises the same words from :func:`qcow2ovl.open`)."""
    if getattr(args, "force_share", False):
        raise ValueError(
            f"Could not open '{args.image}': force-share=on can only be used with read-only images"
        )
