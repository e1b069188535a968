"""Judging an untrusted file before it is used: :func:`inspect` and ``qcow2ovl inspect``.

A verdict on a file that came from a stranger (an upload to an image service, say), without
opening anything it points to: ``safe``, or every reason it is not, and the facts image services
read from ``qemu-img info --output=json``, under its keys. The file is opened read-only for its
header and tables only (``qemu-img info``'s open: no backing file, no data file, no guest data
read), then checked as ``qemu-img check`` checks it. Reasons:

- not a qcow2 image at all (raw data, or another format's magic);
- a backing file (``json:`` pseudo-protocols included) or an external data file: the image
  would read another file of the host;
- features qcow2ovl or QEMU cannot use, and encryption;
- the corrupt bit, the dirty bit (a writer using lazy refcounts died);
- what the scan found: metadata overlapping metadata, tables past the end of the file,
  unaligned pointers, unusable snapshot tables; and metadata the map could not hold;
- sizes past the limits given (virtual size, snapshots, bitmaps);
- corruptions and check errors ``check`` finds (leaks waste space only and are not a reason);
- a file too long to check within the budget: a check counts every cluster of the file, so its
  cost follows the file's length even where the file is sparse; past ``max_check_clusters``
  (default :data:`CHECK_CLUSTERS`) the check is not run and the file is not called safe.

Cost: bounded by what the file holds (``docs/design/scanner.md``); a test runs it under 2 s of
CPU and 1 GiB of address space on hostile files.
"""

from __future__ import annotations

import errno
import os

from qcow2ovl._format import QCOW2_MAGIC
from qcow2ovl.records import Verdict, check_result

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Union

    PathArg = Union[str, os.PathLike[str]]

#: Magic numbers of other image formats, for the "not qcow2" reason.
_OTHER_MAGIC = (
    (b"KDMV", "vmdk"),
    (b"# Disk DescriptorFile", "vmdk"),
    (b"conectix", "vpc"),
    (b"vhdxfile", "vhdx"),
    (b"<<< Oracle VM VirtualBox Disk Image >>>", "vdi"),
    (QCOW2_MAGIC, "qcow2"),
    (b"QFI", "qcow"),
    (b"LUKS\xba\xbe", "luks"),
)


#: Clusters of file length past which :func:`inspect` does not run the check (8 GiB of
#: 512-byte clusters, 1 TiB of 64 KiB ones). The worst file of a given length fills it with
#: snapshot L1 tables lying in holes, each cluster of which the check must count: at 2^25
#: clusters that took 1.5 s of CPU and 278 MB (qemu-img check: 63 s); half that length keeps
#: the judgement well inside a 2 s budget.
CHECK_CLUSTERS = 1 << 24


def _probe(path: str) -> str:
    """The format a file's first bytes name (``raw`` when none)."""
    with open(path, "rb") as f:
        head = f.read(64)
    for magic, name in _OTHER_MAGIC:
        if head.startswith(magic):
            return name
    return "raw"


def inspect(
    path: PathArg,
    *,
    max_virtual_size: int | None = None,
    max_snapshots: int | None = None,
    max_bitmaps: int | None = None,
    max_check_clusters: int | None = CHECK_CLUSTERS,
) -> Verdict:
    """The :class:`~qcow2ovl.Verdict` on the file at *path* (see the module documentation).

    Never raises for what the file holds: an image that cannot be read at all gives a verdict
    with ``readable`` false. Errors of the file system (no such file, permission denied) are
    raised as :class:`OSError`.
    """
    from qcow2ovl import _core
    from qcow2ovl._cli_info import image_info, raw_info
    from qcow2ovl.errors import LockError, Qcow2Error
    from qcow2ovl.image import _open

    name = os.fspath(path)
    fmt = _probe(name)
    if fmt != "qcow2":
        raw = raw_info(name)
        raw["format"] = fmt
        reason = f"not a qcow2 image (its first bytes say {fmt})"
        return Verdict(name, False, True, (reason,), raw)
    reasons: list[str] = []
    try:
        image = _open(name, overlap_check="all", metadata_only=True)
    except LockError:
        raise
    except (Qcow2Error, ValueError) as exc:
        # Read, and refused: the refusal (in QEMU's words) is the reason.
        return Verdict(name, False, True, (str(exc),), {"filename": name, "format": "qcow2"})
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EACCES, errno.EISDIR, errno.EPERM):
            raise
        return Verdict(name, False, False, (f"unreadable: {exc.strerror or exc}",), {})
    with image:
        try:
            facts: dict[str, Any] = image_info(image)
        except Qcow2Error as exc:
            # A LUKS header QEMU refuses to open the image for (in its words).
            return Verdict(name, False, True, (str(exc),), {"filename": name, "format": "qcow2"})
        facts.pop("qcow2ovl", None)
        info = image.info
        if info.backing_file is not None:
            reasons.append(f"backing file: {info.backing_file}")
        if info.data_file is not None:
            reasons.append(f"external data file: {info.data_file}")
        if info.encrypted:
            reasons.append("encrypted")
        if info.corrupt:
            reasons.append("the corrupt bit is set")
        if info.dirty:
            reasons.append("the dirty bit is set (a writer using lazy refcounts stopped)")
        reasons += [f"{p.kind}: {p.message}" for p in image.problems]
        if image.problem_count > len(image.problems):
            reasons.append(f"... and {image.problem_count - len(image.problems)} more problems")
        if image.unchecked_ranges():
            reasons.append(
                "metadata spans more than the file holds (the map left host ranges unchecked)"
            )
        limits = (
            ("virtual size", info.virtual_size, max_virtual_size),
            ("snapshots", len(facts.get("snapshots", ())), max_snapshots),
            ("bitmaps", len(facts["format-specific"]["data"].get("bitmaps", ())), max_bitmaps),
        )
        for what, value, limit in limits:
            if limit is not None and value > limit:
                reasons.append(f"{what} {value} exceeds the limit {limit}")
        clusters = -(-os.stat(name).st_size // info.cluster_size)
        if max_check_clusters is not None and clusters > max_check_clusters:
            reasons.append(
                f"not checked: the file spans {clusters} clusters, more than "
                f"max_check_clusters={max_check_clusters}"
            )
        elif info.data_file is None:
            try:
                # The counters only: a verdict lists no findings.
                result = check_result(name, _core.check_image(image._core, None, False))
            except (Qcow2Error, OSError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                reasons.append(f"check failed: {why}")
            else:
                if result.corruptions:
                    reasons.append(f"check: {result.corruptions} corruptions")
                if result.check_errors:
                    reasons.append(f"check: {result.check_errors} check errors")
                if result.overlap_count:
                    reasons.append(f"check: {result.overlap_count} metadata overlaps")
    return Verdict(name, not reasons, True, tuple(reasons), facts)


__all__ = ["inspect"]
