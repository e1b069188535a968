"""The rest of ``qcow2ovl io``'s qemu-io commands: ``readv``, ``writev``, ``aio_read``,
``aio_write``, ``alloc``, ``map``, ``length``, ``info`` and ``truncate`` (``read``, ``write``,
``discard``, ``flush`` and ``aio_flush`` are in ``_cli_io``).

Every request completes before the next command runs, so the ``aio_`` commands print their
result at once (qemu-io prints it when the request completes, which may be after later
commands' lines) and ``aio_flush`` has nothing to wait for.
"""

from __future__ import annotations

import time

from qcow2ovl._cli_io_words import (
    USAGE,
    CommandError,
    dump,
    io_failure,
    parse_number,
    parse_options,
    parse_pattern,
    size_text,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from qcow2ovl._cli_io import Session


def _vector(name: str, rest: list[str]) -> tuple[int, list[int]]:
    """``off len [len..]``: the offset and the lengths of the buffers."""
    if len(rest) < 2:
        raise CommandError(
            f"bad argument count {len(rest)} to {name}, expected at least 2 arguments",
            to_stderr=True,
        )
    return parse_number(rest[0]), [parse_number(w) for w in rest[1:]]


def _readv(session: Session, words: list[str], name: str, flags: str) -> bool:
    opts, rest = parse_options(name, words, flags)
    if "i" in opts:
        # An invalid request, for QEMU's I/O accounting only: nothing is read.
        print("injecting invalid read request", file=session.out)
        return True
    pattern = parse_pattern(opts["P"]) if "P" in opts else None
    offset, lengths = _vector(name, rest)
    total = sum(lengths)
    t0 = time.perf_counter()
    try:
        data = session.image.read(offset, total)
    except (OSError, ValueError) as exc:
        failure = io_failure("readv", exc)  # (aio_read's failure says readv too)
        if name == "aio_read":  # submitted, so a success for qemu-io whatever happens
            print(failure, file=session.out)
            return True
        raise failure from None
    seconds = time.perf_counter() - t0
    ok = session.check_pattern(data, pattern, offset)
    if "v" in opts and "q" not in opts and data:
        print(dump(data, offset), file=session.out)
    session.done("read", total, offset, seconds, opts)
    # qemu-io's aio_read succeeds once the request is submitted, whatever the data.
    return ok or name == "aio_read"


def readv(session: Session, words: list[str]) -> bool:
    """``readv [-Cqrv] [-P pattern] off len [len..]``: one read of the buffers' total."""
    return _readv(session, words, "readv", "CqrvP:")


def aio_read(session: Session, words: list[str]) -> bool:
    """``aio_read [-Ciqrv] [-P pattern] off len [len..]`` (completed at once)."""
    return _readv(session, words, "aio_read", "CiqrvP:")


def _writev(session: Session, words: list[str], name: str, flags: str) -> bool:
    opts, rest = parse_options(name, words, flags)
    if "u" in opts and "z" not in opts:
        raise CommandError("-u requires -z to be specified")
    if "i" in opts:
        print("injecting invalid write request", file=session.out)
        return True
    pattern = parse_pattern(opts["P"]) if "P" in opts else 0xCD
    offset, lengths = _vector(name, rest)
    total = sum(lengths)
    t0 = time.perf_counter()
    try:
        session.end_check(offset, total)
        if "z" in opts:
            session.image.write_zeroes(offset, total, unmap="u" in opts)
        else:
            session.image.write(offset, bytes([pattern]) * total)
        if "f" in opts:
            session.image.flush()
    except (OSError, ValueError) as exc:
        if name == "aio_write":  # submitted, so a success for qemu-io whatever happens
            print(io_failure(name, exc), file=session.out)
            return True
        raise io_failure(name, exc) from None
    session.done("wrote", total, offset, time.perf_counter() - t0, opts)
    return True


def writev(session: Session, words: list[str]) -> bool:
    """``writev [-Cfqr] [-P pattern] off len [len..]``."""
    return _writev(session, words, "writev", "CfqrP:")


def aio_write(session: Session, words: list[str]) -> bool:
    """``aio_write [-Cfiqruz] [-P pattern] off len [len..]`` (completed at once; with ``-z``
    a pattern is ignored, as there)."""
    return _writev(session, words, "aio_write", "CfiqruzP:")


def _allocated_runs(session: Session, start: int, end: int) -> list[tuple[int, int, bool]]:
    """``(offset, length, allocated)`` runs of ``[start, end)``: allocated in this image
    itself (data or a zero cluster), not in its backing chain, as qemu-io's alloc and map ask."""
    runs: list[tuple[int, int, bool]] = []
    for e in session.image.iter_guest_map():
        lo, hi = max(e.start, start), min(e.start + e.length, end)
        if lo >= hi:
            continue
        here = e.depth == 0 and e.present
        if runs and runs[-1][2] == here and runs[-1][0] + runs[-1][1] == lo:
            runs[-1] = (runs[-1][0], runs[-1][1] + hi - lo, here)
        else:
            runs.append((lo, hi - lo, here))
    return runs


def alloc(session: Session, words: list[str]) -> bool:
    """``alloc offset [count]``: how much of the range this image allocates."""
    if not 1 <= len(words) <= 2:
        raise CommandError(
            f"bad argument count {len(words)} to alloc, expected between 1 and 2 arguments",
            to_stderr=True,
        )
    offset = parse_number(words[0])
    count = parse_number(words[1]) if len(words) > 1 else 512
    count = max(0, min(count, session.image.virtual_size - offset))
    runs = _allocated_runs(session, offset, offset + count)
    done = sum(n for _, n, here in runs if here)
    print(f"{done}/{count} bytes allocated at offset {size_text(offset)}", file=session.out)
    return True


def map_(session: Session, words: list[str]) -> bool:
    """``map``: the runs of the disk this image allocates and those it does not."""
    if words:
        raise CommandError(
            f"bad argument count {len(words)} to map, expected 0 arguments", to_stderr=True
        )
    for off, n, here in _allocated_runs(session, 0, session.image.virtual_size):
        state = "    allocated" if here else "not allocated"
        print(
            f"{size_text(n)} ({n:#x}) bytes {state} at offset {size_text(off)} ({off:#x})",
            file=session.out,
        )
    return True


def length(session: Session, words: list[str]) -> bool:
    """``length``: the disk's size."""
    if words:
        raise CommandError(
            f"bad argument count {len(words)} to length, expected 0 arguments", to_stderr=True
        )
    print(size_text(session.image.virtual_size), file=session.out)
    return True


def info(session: Session, words: list[str]) -> bool:
    """``info``: format, cluster size, where the VM state would start, and the format-specific
    facts as ``qemu-img info`` prints them."""
    from qcow2ovl import _cli_info

    if words:
        raise CommandError(
            f"bad argument count {len(words)} to info, expected 0 arguments", to_stderr=True
        )
    image = session.image
    i = image.info
    cs = i.cluster_size
    per_l1 = cs * (cs // (16 if i.extended_l2 else 8))  # guest bytes one L1 entry covers
    lines = [
        "format name: qcow2",
        f"cluster size: {size_text(cs)}",
        f"vm state offset: {size_text(-(-image.virtual_size // per_l1) * per_l1)}",
        "Format specific information:",
    ]
    data = _cli_info.image_info(image)["format-specific"]["data"]
    _cli_info._dump(data, 1, lines)
    print("\n".join(lines), file=session.out)
    return True


def truncate(session: Session, words: list[str]) -> bool:
    """``truncate [-m off] off``: resize the disk (no preallocation modes: the new part is
    left unallocated and reads as zeros)."""
    if not 1 <= len(words) <= 3:
        raise CommandError(
            f"bad argument count {len(words)} to truncate, expected between 1 and 3 arguments",
            to_stderr=True,
        )
    opts, rest = parse_options("truncate", words, "m:")
    if len(rest) != 1:
        raise CommandError(USAGE["truncate"])
    size = parse_number(rest[0])
    if opts.get("m", "off") != "off":
        # QEMU would preallocate the new part; the engine grows without preallocating.
        print(f"qcow2ovl: truncate: -m {opts['m']} is not supported", file=session.err)
        return False
    if size % 512:
        print("qcow2ovl: The new size must be a multiple of 512", file=session.err)
        return False
    try:
        session.image.resize(size)
    except (OSError, ValueError) as exc:
        print(f"qcow2ovl: {exc}", file=session.err)
        return False
    return True


COMMANDS: dict[str, Callable[[Session, list[str]], bool]] = {
    "readv": readv,
    "writev": writev,
    "aio_read": aio_read,
    "aio_write": aio_write,
    "alloc": alloc,
    "map": map_,
    "length": length,
    "info": info,
    "truncate": truncate,
}

__all__ = ["COMMANDS"]
