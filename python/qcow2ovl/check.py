"""Checking images: :func:`check` and :class:`CheckResult` (``qemu-img check``'s answers).

The Rust core recomputes every cluster's refcount from the metadata and compares it with the
refcount structures on disk (see ``docs/design/check.md``). Its counters mean what qemu-img's
mean; on top of them it names every metadata overlap by pair.
"""

from __future__ import annotations

import os

from qcow2ovl import _core

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from dataclasses import dataclass
    from typing import Any, Union

    from qcow2ovl.image import Image

    PathArg = Union[str, bytes, os.PathLike[str], os.PathLike[bytes]]
else:
    from qcow2ovl._records import dataclass


@dataclass(frozen=True)
class CheckFinding:
    """One problem found by the check.

    ``severity`` says how it counts: ``"corruption"``, ``"leak"`` or ``"check-error"``. ``times``
    is how many times it counts (an L2 table referenced by several L1 tables repeats its
    findings, as qemu-img counts them once per reference).
    ``kind`` is a short name (``"refcount-too-low"``, ``"leaked-cluster"``, ``"copied-flag-l2"``,
    ...); ``message`` is one line in qemu-img's style.
    """

    kind: str
    severity: str
    times: int
    offset: int
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class CheckOverlap:
    """Two structures sharing a cluster they may not share.

    ``first`` and ``second`` describe the two structures as dicts: ``type`` (``"active-l2"``,
    ``"refcount-block"``, ``"data"``, ...), ``offset`` (where the structure starts),
    ``description``, and the indices that apply: ``l1_index``, ``snapshot`` (1-based position in
    the snapshot table), ``refcount_table_index``, ``bitmap``, ``guest_offset``.
    ``cluster_offset`` is the shared cluster.
    """

    message: str
    cluster_offset: int
    first: Mapping[str, Any]
    second: Mapping[str, Any]

    def __str__(self) -> str:
        return self.message

    def as_json(self) -> dict[str, Any]:
        """The overlap as a JSON object (keys with dashes, as in qemu-img's JSON)."""

        def side(d: Mapping[str, Any]) -> dict[str, Any]:
            return {k.replace("_", "-"): v for k, v in d.items()}

        return {
            "message": self.message,
            "cluster-offset": self.cluster_offset,
            "first": side(self.first),
            "second": side(self.second),
        }


@dataclass(frozen=True, repr=False)
class CheckResult:
    """What :meth:`Image.check` found, with ``qemu-img check``'s counters.

    ``corruptions`` (refcounts too low, bad flags, unaligned entries...), ``leaks`` (refcounts
    higher than the references), ``check_errors`` (what could not be examined), ``*_fixed``
    (what a repair fixed, counted as qemu-img counts it; 0 for a plain check; after a repair
    ``corruptions`` and ``leaks`` are what remains), ``image_end_offset``, ``total_clusters``
    (of the virtual disk), ``allocated_clusters``, ``fragmented_clusters`` and
    ``compressed_clusters`` (of the active L1 table). ``findings`` and ``overlaps`` list what
    was found (capped; ``finding_count`` and ``overlap_count`` count everything).
    ``used_runs`` gives the ``(first cluster, count)`` runs of host clusters something
    references. ``repair_log`` lists what a repair found before it started, then what it did
    (``"Repairing cluster ..."``) and what it left alone on purpose (clusters two structures
    use); empty for a plain check.
    """

    filename: str
    corruptions: int
    leaks: int
    check_errors: int
    corruptions_fixed: int
    leaks_fixed: int
    image_end_offset: int
    total_clusters: int
    allocated_clusters: int
    fragmented_clusters: int
    compressed_clusters: int
    findings: tuple[CheckFinding, ...]
    finding_count: int
    overlaps: tuple[CheckOverlap, ...]
    overlap_count: int
    used_runs: tuple[tuple[int, int], ...]
    repair_log: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (
            f"CheckResult(filename={self.filename!r}, corruptions={self.corruptions}, "
            f"leaks={self.leaks}, check_errors={self.check_errors}, "
            f"overlaps={self.overlap_count})"
        )

    @property
    def clean(self) -> bool:
        """Whether nothing at all was found (no corruption, leak, check error or overlap)."""
        return self.exit_code == 0 and self.overlap_count == 0

    @property
    def exit_code(self) -> int:
        """``qemu-img check``'s exit status: 0 clean, 1 check errors, 2 corruptions, 3 leaks."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def as_qemu_dict(self) -> dict[str, Any]:
        """The JSON object of ``qemu-img check --output=json`` (counters that are 0 left out, as
        qemu-img does), plus ``overlaps``."""
        d: dict[str, Any] = {}
        if self.image_end_offset:
            d["image-end-offset"] = self.image_end_offset
        if self.total_clusters:
            d["total-clusters"] = self.total_clusters
        for key, value in (
            ("corruptions", self.corruptions),
            ("leaks", self.leaks),
            ("corruptions-fixed", self.corruptions_fixed),
            ("leaks-fixed", self.leaks_fixed),
        ):
            if value:
                d[key] = value
        d["check-errors"] = self.check_errors
        for key, value in (
            ("allocated-clusters", self.allocated_clusters),
            ("fragmented-clusters", self.fragmented_clusters),
            ("compressed-clusters", self.compressed_clusters),
        ):
            if value:
                d[key] = value
        d["filename"] = self.filename
        d["format"] = "qcow2"
        d["overlaps"] = [o.as_json() for o in self.overlaps]
        return d

    def problem_lines(self) -> list[str]:
        """One line per finding and per overlap, as ``qemu-img check`` prints them."""
        lines = [f.message for f in self.findings]
        if self.finding_count > len(self.findings):
            lines.append(f"... and {self.finding_count - len(self.findings)} more findings")
        lines += [f"OVERLAP {o.message}" for o in self.overlaps]
        if self.overlap_count > len(self.overlaps):
            lines.append(f"... and {self.overlap_count - len(self.overlaps)} more overlaps")
        return lines

    def summary(self) -> str:
        """The summary ``qemu-img check`` prints after the problems, in the same shape."""
        out: list[str] = []
        if not (self.corruptions or self.leaks or self.check_errors):
            out.append("No errors were found on the image.")
        if self.corruptions:
            out += [
                "",
                f"{self.corruptions} errors were found on the image.",
                "Guest data may already be damaged, and writing to the image may damage more.",
            ]
        if self.leaks:
            out += [
                "",
                f"{self.leaks} leaked clusters were found on the image.",
                "They waste space in the file; guest data is not affected.",
            ]
        if self.check_errors:
            out += ["", f"{self.check_errors} internal errors have occurred during the check."]
        if self.overlap_count:
            out += ["", f"{self.overlap_count} metadata overlaps were found (listed above)."]
        if self.total_clusters and self.allocated_clusters:
            a = self.allocated_clusters
            out.append(
                f"{a}/{self.total_clusters} = {a * 100.0 / self.total_clusters:.2f}% allocated, "
                f"{self.fragmented_clusters * 100.0 / a:.2f}% fragmented, "
                f"{self.compressed_clusters * 100.0 / a:.2f}% compressed clusters"
            )
        if self.image_end_offset:
            out.append(f"Image end offset: {self.image_end_offset}")
        return "\n".join(out)


def _result(filename: str, d: Mapping[str, Any]) -> CheckResult:
    return CheckResult(
        filename=filename,
        corruptions=d["corruptions"],
        leaks=d["leaks"],
        check_errors=d["check_errors"],
        corruptions_fixed=d["corruptions_fixed"],
        leaks_fixed=d["leaks_fixed"],
        image_end_offset=d["image_end_offset"],
        total_clusters=d["total_clusters"],
        allocated_clusters=d["allocated_clusters"],
        fragmented_clusters=d["fragmented_clusters"],
        compressed_clusters=d["compressed_clusters"],
        findings=tuple(CheckFinding(*f) for f in d["findings"]),
        finding_count=d["finding_count"],
        overlaps=tuple(
            CheckOverlap(o["message"], o["cluster_offset"], o["first"], o["second"])
            for o in d["overlaps"]
        ),
        overlap_count=d["overlap_count"],
        used_runs=tuple((int(a), int(b)) for a, b in d["used_runs"]),
        repair_log=tuple(str(line) for line in d.get("repair_log", ())),
    )


def check_image(image: Image, progress: Callable[[int, int], object] | None = None) -> CheckResult:
    """Check an open image (the implementation of :meth:`Image.check`)."""
    d = _core.check_image(image._core, progress)
    return _result(image.path, d)


def check(
    path: PathArg,
    repair: str | None = None,
    progress: Callable[[int, int], object] | None = None,
) -> CheckResult:
    """Check the image at *path* as ``qemu-img check`` does (opened read-only).

    With *repair* (``"leaks"`` or ``"all"``, as ``qemu-img check -r``) the image is opened for
    repair instead (writable, even when marked corrupt, dirty or with overlapping metadata;
    every write is still checked against the metadata map), repaired, and checked again: the
    result is that final check, with ``corruptions_fixed`` and ``leaks_fixed`` set. Clusters
    that two metadata structures use are never repaired: they stay in ``corruptions`` and in
    ``overlaps``. ``"leaks"`` raises :class:`OSError` (``EIO``) when the refcount structure is
    damaged and must be rebuilt, which only ``"all"`` does. See ``docs/design/check.md``.

    *progress*, if given, is called with ``(done, total)`` L2 table references as the check
    walks them (a plain check only).
    """
    from qcow2ovl.image import open as open_image

    if repair is not None:
        if repair not in ("leaks", "all"):
            raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
        name = os.fsdecode(path)
        return _result(name, _core.repair_image(name, repair))
    with open_image(path, overlap_check="none") as image:
        return check_image(image, progress)


__all__ = ["CheckFinding", "CheckOverlap", "CheckResult", "check"]
