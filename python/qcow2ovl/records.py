"""The records qcow2ovl hands out, in one leaf module that every other module imports.

:class:`ImageInfo`, :class:`Snapshot`, :class:`Bitmap`, :class:`Problem` and
:class:`GuestExtent` describe an open :class:`~qcow2ovl.Image`; :class:`CheckResult`,
:class:`CheckFinding` and :class:`CheckOverlap` what a check found. All are importable from
``qcow2ovl`` (and from ``qcow2ovl.image`` or ``qcow2ovl.check``, where they used to live).

Records cross the boundary from the Rust core by name, never by position alone: a single record
comes as a dict keyed by field name (:func:`from_fields`), a list of many as one tuple of field
names followed by plain tuples (:func:`from_rows`, cheap for the thousands of extents of a guest
map). A field renamed on one side and not the other fails loudly, at the first call.
"""

from __future__ import annotations

# Startup time: datetime, dataclasses and typing are for type checkers only (the records come
# from _frozen at run time; Snapshot.date imports datetime when called).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import datetime as _dt
    from collections.abc import Iterable, Mapping, Sequence
    from dataclasses import dataclass
    from typing import Any, TypeVar

    _R = TypeVar("_R")
else:
    from qcow2ovl._frozen import dataclass


def record_fields(cls: type[Any]) -> tuple[str, ...]:
    """The field names of record class *cls*, in order."""
    fields: tuple[str, ...] = getattr(cls, "__record_fields__", None) or tuple(
        cls.__dataclass_fields__
    )
    return fields


def from_fields(cls: type[_R], fields: Mapping[str, Any]) -> _R:
    """A *cls* record from a dict keyed by field name (a missing or unknown key raises
    ``TypeError``)."""
    return cls(**fields)


def from_rows(cls: type[_R], table: tuple[Sequence[str], Iterable[Sequence[Any]]]) -> list[_R]:
    """*cls* records from ``(field names, rows)``: the names must be the record's fields in
    order (else ``TypeError`` naming both), each row their values."""
    names, rows = table
    if tuple(names) != record_fields(cls):
        raise TypeError(
            f"{cls.__name__} fields {record_fields(cls)} do not match the core's {tuple(names)}"
        )
    return [cls(*row) for row in rows]


@dataclass(frozen=True)
class ImageInfo:
    """Facts from an image's header as it was when the image was opened (a frozen record: after
    :meth:`Image.resize` or a snapshot operation, :attr:`Image.virtual_size` and
    :attr:`Image.snapshots` give the current values; a new :func:`open` gives new facts).

    ``crypt_method`` is 0 (none), 1 (legacy AES) or 2 (LUKS). ``features`` names every set feature
    bit in QEMU's words (``"dirty bit"``, ``"corrupt bit"``, ``"external data file"``,
    ``"compression type"``, ``"extended L2 entries"``, ``"lazy refcounts"``, ``"bitmaps"``,
    ``"raw external data"``), unknown bits from the feature name table or by number.
    """

    version: int
    virtual_size: int
    cluster_size: int
    refcount_bits: int
    compression_type: str
    extended_l2: bool
    crypt_method: int
    lazy_refcounts: bool
    dirty: bool
    corrupt: bool
    backing_file: str | None
    backing_format: str | None
    data_file: str | None
    features: tuple[str, ...]
    l1_table_offset: int
    l1_size: int
    refcount_table_offset: int
    refcount_table_clusters: int
    snapshots_offset: int
    crypto_header: tuple[int, int] | None
    file_size: int

    @property
    def encrypted(self) -> bool:
        """Whether guest data is encrypted (AES or LUKS)."""
        return self.crypt_method != 0


@dataclass(frozen=True)
class Snapshot:
    """An internal snapshot. ``vm_state_size`` is in bytes; ``disk_size`` is None for v2 entries
    without the extra data; ``date`` is the creation time in UTC."""

    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    disk_size: int | None
    icount: int | None

    @property
    def date(self) -> _dt.datetime:
        """Creation time (UTC)."""
        import datetime as _dt

        return _dt.datetime.fromtimestamp(self.date_sec + self.date_nsec / 1e9, tz=_dt.timezone.utc)


@dataclass(frozen=True)
class Bitmap:
    """A persistent dirty bitmap, as ``qemu-img info`` lists it: ``name``, ``granularity`` (guest
    bytes per bit), ``flags`` (bit 0 ``in-use``, bit 1 ``auto``), and where its table is.

    A bitmap found in use when the image was opened is *inconsistent*: a writer stopped without
    storing it, so its bits cannot be trusted (:meth:`Image.dirty_extents` refuses it). A
    consistent bitmap stays consistent through every write of a writable handle, which marks
    the enabled ones and stores them at :meth:`Image.close`.
    """

    name: str
    granularity: int
    flags: int
    table_offset: int
    table_size: int

    @property
    def in_use(self) -> bool:
        """Whether the bitmap was found in use at open (the same as :attr:`inconsistent`)."""
        return bool(self.flags & 1)

    @property
    def inconsistent(self) -> bool:
        """Whether the bitmap's bits cannot be trusted (it was in use at open)."""
        return self.in_use

    @property
    def auto(self) -> bool:
        """Whether the bitmap tracks every write automatically (QEMU's ``auto`` flag)."""
        return bool(self.flags & 2)

    @property
    def enabled(self) -> bool:
        """Whether writes mark the bitmap (the same as :attr:`auto`)."""
        return self.auto

    @property
    def persistent(self) -> bool:
        """Always true: every bitmap in an image file is persistent."""
        return True


@dataclass(frozen=True)
class Problem:
    """A problem the scan found in the image's metadata.

    ``kind`` is one of ``"unaligned"`` (a table or pointer off a cluster boundary),
    ``"beyond-end"`` (a pointer past the end of the file), ``"unmappable"`` (past 2^56),
    ``"metadata-overlap"`` (two metadata structures share a cluster) and ``"unusable-snapshot"``
    (a snapshot L1 table QEMU would refuse to use). ``offset`` and ``size`` give the host range
    concerned; ``message`` says which structures. ``str(problem)`` is the message.
    """

    kind: str
    offset: int
    size: int
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class GuestExtent:
    """A range of the guest disk, with the fields of ``qemu-img map --output=json``.

    ``depth`` is the layer of the backing chain that provides the range (0: this image);
    ``present`` whether that layer allocates it; ``zero`` whether it reads as zeros; ``data``
    whether the layer holds data for it; ``compressed`` whether that data is compressed;
    ``offset`` where the range starts in the layer's file (its external data file, if any), or
    ``None`` when there is no such place (unallocated, compressed, encrypted).
    """

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    compressed: bool
    offset: int | None

    def as_qemu_dict(self) -> dict[str, Any]:
        """The entry as ``qemu-img map --output=json`` prints it (no ``offset`` key when
        ``None``)."""
        d: dict[str, Any] = {
            "start": self.start,
            "length": self.length,
            "depth": self.depth,
            "present": self.present,
            "zero": self.zero,
            "data": self.data,
            "compressed": self.compressed,
        }
        if self.offset is not None:
            d["offset"] = self.offset
        return d


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
    was found (capped; ``finding_count`` and ``overlap_count`` count everything);
    ``unnamed_metadata`` counts metadata clusters past the 4 Mi the check tracks for naming
    overlaps (0 for any real image; a hostile file's tables can claim billions).
    ``used_runs`` gives the ``(first cluster, count)`` runs of host clusters something
    references. ``repair_log`` lists what a repair found before it started, then what it did
    (``"Repairing cluster ..."``) and what it left alone on purpose (clusters two structures
    use); empty for a plain check. ``exit_code`` is ``qemu-img check``'s exit status for the
    result: 0 clean, 1 check errors, 2 corruptions, 3 leaks.
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
    unnamed_metadata: int
    used_runs: tuple[tuple[int, int], ...]
    repair_log: tuple[str, ...]
    exit_code: int

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
        if self.unnamed_metadata:
            out += [
                "",
                f"{self.unnamed_metadata} metadata clusters were too many to look at for "
                "overlaps (counted all the same).",
            ]
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


@dataclass(frozen=True, repr=False)
class Verdict:
    """What :func:`qcow2ovl.inspect` says about an untrusted file.

    ``safe`` is true when ``reasons`` is empty; each reason is one line. ``readable`` is false
    when the file could not even be read (an I/O error). ``facts`` is ``qemu-img info
    --output=json``'s object for the file, key for key (empty when unreadable; for a file that
    is not qcow2, the object qemu-img gives a raw file, with ``format`` the one its magic
    names). ``exit_code`` is ``qcow2ovl inspect``'s exit status: 0 safe, 1 unsafe, 2
    unreadable.
    """

    filename: str
    safe: bool
    readable: bool
    reasons: tuple[str, ...]
    facts: Mapping[str, Any]

    def __repr__(self) -> str:
        return f"Verdict(filename={self.filename!r}, safe={self.safe}, reasons={self.reasons!r})"

    @property
    def exit_code(self) -> int:
        """0 safe, 1 unsafe, 2 unreadable."""
        return 0 if self.safe else 1 if self.readable else 2

    def as_json(self) -> dict[str, Any]:
        """The verdict as ``qcow2ovl inspect --output json`` prints it."""
        return {
            "filename": self.filename,
            "safe": self.safe,
            "readable": self.readable,
            "reasons": list(self.reasons),
            "info": dict(self.facts),
        }


def check_result(filename: str, report: Mapping[str, Any]) -> CheckResult:
    """A :class:`CheckResult` from the core's report of a check of *filename*: a dict keyed by
    the record's field names, with ``findings`` as rows and ``overlaps`` as dicts."""
    fields = dict(report)
    fields["filename"] = filename
    fields["findings"] = tuple(from_rows(CheckFinding, report["findings"]))
    fields["overlaps"] = tuple(from_fields(CheckOverlap, o) for o in report["overlaps"])
    fields["used_runs"] = tuple((int(a), int(b)) for a, b in report["used_runs"])
    fields["repair_log"] = tuple(str(line) for line in report["repair_log"])
    return from_fields(CheckResult, fields)


__all__ = [
    "Bitmap",
    "CheckFinding",
    "CheckOverlap",
    "CheckResult",
    "GuestExtent",
    "ImageInfo",
    "Problem",
    "Snapshot",
    "Verdict",
    "check_result",
    "from_fields",
    "from_rows",
    "record_fields",
]
