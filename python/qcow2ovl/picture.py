"""A picture of the host file: its clusters as a grid of cells coloured by what they hold.

:func:`render_layout` draws an open image, :func:`write_picture` an image file into an SVG
file (``qcow2ovl map --picture``). The drawing itself, and what its colours mean, is in
:mod:`qcow2ovl._layout_svg`; the colour constants are re-exported here.
"""

from __future__ import annotations

import os

from qcow2ovl._layout_svg import DATA_COLOUR as DATA_COLOUR
from qcow2ovl._layout_svg import FREE_COLOUR as FREE_COLOUR
from qcow2ovl._layout_svg import PROBLEM_COLOUR as PROBLEM_COLOUR
from qcow2ovl._layout_svg import TYPE_COLOURS as TYPE_COLOURS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Union

    from qcow2ovl.image import Image
    from qcow2ovl.records import CheckResult

    PathArg = Union[str, bytes, os.PathLike[str], os.PathLike[bytes]]


def render_layout(
    image: Image,
    *,
    columns: int = 64,
    max_cells: int = 4096,
    cell_size: int = 12,
    check: CheckResult | None = None,
    title: str | None = None,
) -> str:
    """SVG text drawing *image*'s host file (the same as :meth:`Image.render_layout`).

    *columns* cells per row; at most *max_cells* cells (clusters are grouped per cell beyond
    that); *cell_size* pixels per cell. *check* is a :class:`~qcow2ovl.CheckResult` of the
    image (run now when not given): it tells data from free clusters and marks problems.
    *title* defaults to the image's file name.
    """
    return image.render_layout(
        columns=columns, max_cells=max_cells, cell_size=cell_size, check=check, title=title
    )


def write_picture(path: PathArg, svg_path: str, overlap_check: str = "all") -> None:
    """Draw the image at *path* into *svg_path* (``qcow2ovl map --picture``)."""
    from qcow2ovl.image import open as open_image

    with open_image(path, overlap_check=overlap_check) as image:
        svg = image.render_layout()
    with open(svg_path, "w", encoding="utf-8") as f:
        f.write(svg)


__all__ = [
    "DATA_COLOUR",
    "FREE_COLOUR",
    "PROBLEM_COLOUR",
    "TYPE_COLOURS",
    "render_layout",
    "write_picture",
]
