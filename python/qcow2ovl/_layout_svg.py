"""Drawing the host file as a grid of cells coloured by what they hold, from plain data.

Pure Python, SVG text, no dependency, and a leaf: it knows nothing of :class:`~qcow2ovl.Image`
(:meth:`Image.render_layout <qcow2ovl.Image.render_layout>` gathers the facts and calls
:func:`draw`). Each cell is one cluster, or for big files a run of clusters (the scale says how
many); a cell takes the colour of what covers most of it (a metadata type, guest data, or
nothing), and a cell that also holds metadata of another colour gets a stripe of that colour
along its bottom edge. Cells where structures overlap, or where the check or the scan found a
problem, are outlined in red. A legend and a scale follow the grid.
"""

from __future__ import annotations

from xml.sax.saxutils import escape

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

    from qcow2ovl.records import CheckResult

#: Colour of clusters nothing references.
FREE_COLOUR = "#eeeeee"
#: Colour of guest data clusters (referenced, not metadata).
DATA_COLOUR = "#6baed6"
#: Colour of overlaps and problems (never used for a type).
PROBLEM_COLOUR = "#d62728"
#: Colour of each metadata type, by its option key.
TYPE_COLOURS: dict[str, str] = {
    "main-header": "#252525",
    "active-l1": "#e6550d",
    "active-l2": "#fdae6b",
    "refcount-table": "#006d2c",
    "refcount-block": "#74c476",
    "snapshot-table": "#54278f",
    "inactive-l1": "#9e9ac8",
    "inactive-l2": "#dadaeb",
    "bitmap-directory": "#8c6d31",
    "crypto-header": "#e7ba52",
    "bitmap-table": "#bd9e39",
}
_LABELS: dict[str, str] = {
    "free": "free",
    "data": "guest data",
    "main-header": "header",
    "active-l1": "active L1 table",
    "active-l2": "active L2 tables",
    "refcount-table": "refcount table",
    "refcount-block": "refcount blocks",
    "snapshot-table": "snapshot table",
    "inactive-l1": "snapshot L1 tables",
    "inactive-l2": "snapshot L2 tables",
    "bitmap-directory": "bitmap directory",
    "crypto-header": "encryption header",
    "bitmap-table": "bitmap tables",
}


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:g} {unit}" if unit == "bytes" else f"{n:.4g} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)  # pragma: no cover


def check_options(columns: int, max_cells: int, cell_size: int) -> None:
    """Refuse picture options that cannot be drawn (``ValueError``)."""
    if columns < 1 or max_cells < 1 or cell_size < 2:
        raise ValueError("columns and max_cells must be at least 1, cell_size at least 2")


def draw(
    *,
    title: str,
    cluster_size: int,
    file_size: int,
    metadata_extents: Iterable[tuple[int, int, int]],
    problems: Iterable[tuple[int, int]],
    check: CheckResult,
    columns: int = 64,
    max_cells: int = 4096,
    cell_size: int = 12,
) -> str:
    """SVG text drawing a host file of *file_size* bytes in clusters of *cluster_size* (see the
    module docstring): *metadata_extents* are ``(offset, length, type bits)``, *problems* the
    ``(offset, size)`` ranges the scan flagged, *check* a check of the same file (it tells data
    from free clusters and marks problems). *columns* cells per row; at most *max_cells* cells
    (clusters are grouped per cell beyond that); *cell_size* pixels per cell.
    """
    from qcow2ovl.types import SINGLE_TYPES

    check_options(columns, max_cells, cell_size)
    cs = cluster_size
    clusters = max(1, -(-file_size // cs))
    per = -(-clusters // max_cells)
    cells = -(-clusters // per)
    cell_bytes = per * cs
    rows = -(-cells // columns)

    # Bytes of each category in each cell.
    meta: list[dict[str, int]] = [{} for _ in range(cells)]
    used = [0] * cells
    red = bytearray(cells)

    def spread(offset: int, length: int, visit: object) -> None:
        end = min(offset + length, cells * cell_bytes)
        at = offset
        while at < end:
            c = at // cell_bytes
            stop = min(end, (c + 1) * cell_bytes)
            visit(c, stop - at)  # type: ignore[operator]
            at = stop

    keys = {int(t): t.key for t in SINGLE_TYPES}
    for offset, length, types in metadata_extents:
        bits = int(types)
        # Every type present counts (the first colours the cell, another one its stripe).
        present_keys = tuple(k for b, k in keys.items() if bits & b) or ("main-header",)

        def add_meta(
            c: int, n: int, ks: tuple[str, ...] = present_keys, multi: bool = len(present_keys) > 1
        ) -> None:
            for key in ks:
                meta[c][key] = meta[c].get(key, 0) + n
            if multi:
                red[c] = 1

        spread(offset, length, add_meta)
    for first, count in check.used_runs:

        def add_used(c: int, n: int) -> None:
            used[c] += n

        spread(first * cs, count * cs, add_used)

    def mark(c: int, _n: int) -> None:
        red[c] = 1

    for o in check.overlaps:
        spread(o.cluster_offset, cs, mark)
    for f in check.findings:
        if f.severity in ("corruption", "check-error") and f.offset:
            spread(f.offset, 1, mark)
    for offset, size in problems:
        spread(offset, max(1, min(size, cs)), mark)

    margin, label_w, gap = 10, 130, 1
    pitch = cell_size + gap
    grid_w = columns * pitch
    grid_h = rows * pitch
    head = 44
    present: list[str] = []
    body: list[str] = []
    for c in range(cells):
        m = meta[c]
        m_total = min(cell_bytes, sum(m.values()))
        data = max(0, min(cell_bytes, used[c]) - m_total)
        free = max(0, cell_bytes - m_total - data)
        counts = dict(m)
        counts["data"] = data
        counts["free"] = free
        main = max(counts, key=lambda k: counts[k])
        colour = TYPE_COLOURS.get(main, DATA_COLOUR if main == "data" else FREE_COLOUR)
        for k, v in counts.items():
            if v and k not in present:
                present.append(k)
        x = margin + label_w + (c % columns) * pitch
        y = margin + head + (c // columns) * pitch
        start = c * cell_bytes
        tip = ", ".join(
            f"{_LABELS.get(k, k)} {v * 100 // cell_bytes}%" for k, v in counts.items() if v
        )
        attrs = f'x="{x}" y="{y}" width="{cell_size}" height="{cell_size}" fill="{colour}"'
        if red[c]:
            attrs += f' stroke="{PROBLEM_COLOUR}" stroke-width="2" class="problem"'
        body.append(f"<rect {attrs}><title>{start:#x}: {escape(tip)}</title></rect>")
        others = [k for k in m if k != main]
        if others:
            stripe = TYPE_COLOURS[max(others, key=lambda k: m[k])]
            sh = max(2, cell_size // 4)
            body.append(
                f'<rect x="{x}" y="{y + cell_size - sh}" width="{cell_size}" height="{sh}" '
                f'fill="{stripe}"/>'
            )
    for r in range(rows):
        y = margin + head + r * pitch + cell_size - 2
        body.append(
            f'<text x="{margin + label_w - 6}" y="{y}" text-anchor="end" '
            f'font-size="{min(11, max(8, cell_size - 2))}">{r * columns * cell_bytes:#x}</text>'
        )

    # Legend and scale under the grid.
    order = ["free", "data", *TYPE_COLOURS]
    legend_y = margin + head + grid_h + 16
    legend: list[str] = []
    entries = [k for k in order if k in present] + ["problem"]
    width = max(margin * 2 + label_w + grid_w, 600)
    per_row = max(1, (width - 2 * margin) // 190)
    for i, k in enumerate(entries):
        x = margin + (i % per_row) * 190
        y = legend_y + (i // per_row) * 20
        if k == "problem":
            sw = f'fill="#ffffff" stroke="{PROBLEM_COLOUR}" stroke-width="2"'
            text = "overlap or problem"
        else:
            fill = FREE_COLOUR if k == "free" else DATA_COLOUR if k == "data" else TYPE_COLOURS[k]
            sw = f'fill="{fill}" stroke="#999999" stroke-width="0.5"'
            text = _LABELS[k]
        legend.append(f'<rect x="{x}" y="{y}" width="14" height="14" {sw} class="legend"/>')
        legend.append(f'<text x="{x + 20}" y="{y + 12}" font-size="12">{escape(text)}</text>')
    legend_h = (-(-len(entries) // per_row)) * 20
    scale_y = legend_y + legend_h + 18
    scale = (
        f"1 cell = {per} cluster{'s' if per > 1 else ''} ({_size(cell_bytes)}); "
        f"1 row = {_size(columns * cell_bytes)}; file {_size(file_size)}, "
        f"{clusters} clusters of {_size(cs)}"
    )
    bar_cells = min(columns, 16)
    bar = (
        f'<rect x="{margin}" y="{scale_y + 6}" width="{bar_cells * pitch}" height="4" '
        f'fill="#333333"/><text x="{margin + bar_cells * pitch + 6}" y="{scale_y + 12}" '
        f'font-size="12">{_size(bar_cells * cell_bytes)}</text>'
    )
    height = scale_y + 40
    summary = (
        f"{check.corruptions} corruptions, {check.leaks} leaks, {check.overlap_count} overlaps"
    )
    header = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif">',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{margin}" y="{margin + 16}" font-size="16" font-weight="bold">'
        f"{escape(title)}</text>",
        f'<text x="{margin}" y="{margin + 34}" font-size="12">{escape(summary)}</text>',
        '<g class="grid">',
    ]
    footer = [
        "</g>",
        f'<g class="legend">{"".join(legend)}</g>',
        f'<text x="{margin}" y="{scale_y}" font-size="12" class="scale">{escape(scale)}</text>',
        bar,
        "</svg>",
    ]
    return "\n".join(header + body + footer) + "\n"
