"""Placing the planned runs of clusters in the file (at random among the free places, with
gaps), with a refcount table and refcount blocks sized to cover them."""

from __future__ import annotations

from qcow2ovl.testing._common import (
    _ceil_div,
)
from qcow2ovl.testing._model import _Alloc, _State
from qcow2ovl.types import MetadataType


def _free_starts(used: list[bool], n: int) -> list[int]:
    """Every index where `n` free clusters start."""
    out: list[int] = []
    run = 0
    for i, u in enumerate(used):
        run = 0 if u else run + 1
        if run >= n:
            out.append(i - n + 1)
    return out


class _Placer(_State):
    """Gives every run of clusters its place."""

    # -- placement ------------------------------------------------------------------------------

    def place(self) -> None:
        c, cs = self.c, self.cs
        epb = cs * 8 // (1 << self.refcount_order)
        gaps = c.integer(0, 4)
        if c.rarely():  # enough free clusters to need several refcount blocks, some empty
            gaps += c.integer(0, max(0, min(3 * epb, self.budget - self.used - 2)))
        extra_rt = 1 if c.rarely() else 0
        base = 1 + sum(a.clusters for a in self.allocs)
        rb, rt = 1, 1
        while True:
            total = base + rb + rt + gaps
            nrb = _ceil_div(total, epb)
            nrt = _ceil_div(nrb * 8, cs) + extra_rt
            if nrb <= rb and nrt <= rt:
                break
            rb, rt = max(rb, nrb), max(rt, nrt)
        self.reftable = _Alloc("refcount table", "refcount table", rt, MetadataType.REFCOUNT_TABLE)
        self.reftable.refs = [1] * rt
        self.refblocks = [
            _Alloc("refcount block", f"refcount block {i}", 1, MetadataType.REFCOUNT_BLOCK)
            for i in range(rb)
        ]
        for b in self.refblocks:
            b.refs[0] = 1
        everything = [*self.allocs, self.reftable, *self.refblocks]
        self.host_clusters = total
        used = [False] * total
        used[0] = True
        # sometimes keep one whole refcount block's range free (a hole in the refcount table)
        hole = range(0)
        if gaps >= epb and c.boolean():
            block = c.integer(1, max(1, total // epb - 1))
            if (block + 1) * epb <= total:
                hole = range(block * epb, (block + 1) * epb)
                for i in hole:
                    used[i] = True
        order = sorted(everything, key=lambda a: -a.clusters)
        for a in order:
            n = a.clusters
            starts = _free_starts(used, n)
            if starts:
                a.start = starts[c.integer(0, len(starts) - 1)]
            else:  # fragmented: append at the end
                a.start = len(used)
                used.extend([False] * n)
            for i in range(a.start, a.start + n):
                used[i] = True
        # the file grew past what the refcount blocks cover: add blocks at the end
        while len(used) > len(self.refblocks) * epb:
            b = _Alloc(
                "refcount block",
                f"refcount block {len(self.refblocks)}",
                1,
                MetadataType.REFCOUNT_BLOCK,
            )
            b.refs[0] = 1
            b.start = len(used)
            used.append(True)
            self.refblocks.append(b)
        if len(self.refblocks) * 8 > rt * cs:
            # not at the sizes generated: one refcount table cluster covers 64+ blocks
            raise AssertionError("refcount table too small")
        for i in hole:
            used[i] = False
        self.host_clusters = len(used)
        # refcount blocks whose range holds nothing are left out (a hole in the refcount table),
        # unless the image keeps them all
        keep_all = c.boolean()
        needed = {0}
        for a in [*self.allocs, self.reftable]:
            needed.update((a.start + i) // epb for i in range(a.clusters))
        if keep_all:
            needed.update(range(len(self.refblocks)))
        while True:
            more = {self.refblocks[i].start // epb for i in needed} - needed
            if not more:
                break
            needed |= more
        self.refblock_at = {i: self.refblocks[i] for i in sorted(needed)}
