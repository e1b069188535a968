"""Progress as qemu-img prints it with ``-p``: ``    (NN.NN/100%)`` lines separated by ``\\r``,
from ``(0.00/100%)`` to ``(100.00/100%)`` and a newline, so that tools that read qemu-img's
progress (``\\((\\d?\\d\\.\\d\\d)\\/100%\\)``) read ours. Like qemu-img, a line is printed at the
start, whenever the share done has grown by at least one point, and twice at 100 (the last
followed by the newline); not only on a terminal: pipelines read it from a pipe."""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TextIO


class Progress:
    """A ``progress(done, total)`` callable that prints qemu-img's progress lines."""

    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out if out is not None else sys.stdout
        self._last = -1.0

    def _print(self, pct: float) -> None:
        self._out.write(f"    ({pct:.2f}/100%)\r")
        self._out.flush()
        self._last = pct

    def start(self) -> None:
        """The first line, ``(0.00/100%)``."""
        self._print(0.0)

    def __call__(self, done: int, total: int) -> None:
        pct = 100.0 if total <= 0 else min(100.0, 100.0 * done / total)
        if pct >= self._last + 1.0 or (pct == 100.0 and self._last < 100.0):
            self._print(pct)

    def end(self) -> None:
        """The last line, ``(100.00/100%)``, and the newline."""
        self._print(100.0)
        self._out.write("\n")
        self._out.flush()


__all__ = ["Progress"]
