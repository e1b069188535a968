"""Checking many images: one :func:`qcow2ovl.check` per image, on a local process pool or on a
Dask cluster (:func:`check`, :func:`iter_check`; ``qcow2ovl fleet check`` on the command line).

Each image is checked where it is, by a worker process that opens it by path: only paths go out
and small result records (``qemu-img check``'s JSON keys) come back, never image data. An image
that cannot be opened or checked is a result (its ``error`` says why, a
:class:`~qcow2ovl.LockError` when a VM holds the image among them), never an exception. A worker
that dies while it checks images costs those images a retry; an image whose workers died
:data:`MAX_DEATHS` times is reported as an error result (Dask's scheduler applies its own
``allowed-failures`` setting, 3 by default, the same rule).

The local pool needs nothing beyond the standard library. Dask (``pip install
'qcow2ovl[fleet]'``, the ``distributed`` package) is imported only when a cluster is used.
See ``docs/fleet.md``.
"""

from __future__ import annotations

import os

from qcow2ovl import _core
from qcow2ovl._fleet_worker import EXIT_FAILED as EXIT_FAILED
from qcow2ovl._fleet_worker import EXIT_NOT_SUPPORTED as EXIT_NOT_SUPPORTED
from qcow2ovl._fleet_worker import check_one as check_one
from qcow2ovl._fleet_worker import error_record as error_record
from qcow2ovl._fleet_worker import expand_paths as expand_paths
from qcow2ovl._fleet_worker import split_host as split_host

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping
    from dataclasses import dataclass
    from typing import Any, Union

    PathArg = Union[str, os.PathLike[str]]
    Progress = Callable[[int, int], object]
else:
    from qcow2ovl._frozen import dataclass

#: How many times the workers checking one image may die before the image is reported as an
#: error result (Dask's ``distributed.scheduler.allowed-failures`` default).
MAX_DEATHS = 3

# Worst first: qemu-img's own precedence within one image (check errors, then corruptions,
# then leaks), an image that could not be checked for being unsupported after those, clean last.
_RANK = {EXIT_FAILED: 4, 2: 3, 3: 2, EXIT_NOT_SUPPORTED: 1, 0: 0}


@dataclass(frozen=True)
class FleetResult:
    """One image's result.

    ``record`` is its JSON line: the keys of ``qemu-img check --output=json`` (when the image
    was checked; with ``overlaps``, as :meth:`CheckResult.as_qemu_dict` gives them), plus
    ``filename``, ``exit-status`` (what ``qemu-img check`` exits with for this image), ``host``
    (the host name of the worker that checked it) and, when the image could not be checked,
    ``error`` (one message, qemu-img's where it has one: ``Could not open 'PATH': ...``).
    """

    filename: str
    exit_code: int
    host: str
    error: str | None
    record: Mapping[str, Any]

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> FleetResult:
        """The result of one JSON line (as :meth:`as_json` or a worker made it)."""
        return cls(
            filename=str(record["filename"]),
            exit_code=int(record["exit-status"]),
            host=str(record.get("host", "")),
            error=None if record.get("error") is None else str(record["error"]),
            record=dict(record),
        )

    def as_json(self) -> dict[str, Any]:
        """The JSON line of this image (a copy of ``record``)."""
        return dict(self.record)

    @property
    def status(self) -> str:
        """``clean``, ``leaks``, ``corrupt``, ``check-errors`` (the check did not complete),
        ``unsupported`` or ``error`` (not checked: see ``error``)."""
        if self.error is not None:
            return "unsupported" if self.exit_code == EXIT_NOT_SUPPORTED else "error"
        return {0: "clean", 1: "check-errors", 2: "corrupt", 3: "leaks"}.get(
            self.exit_code, "error"
        )

    @property
    def severity(self) -> int:
        """Larger is worse (the order of :func:`worst_exit_code` and of the human table)."""
        return _RANK.get(self.exit_code, _RANK[EXIT_FAILED])

    def count(self, key: str) -> int:
        """One of qemu-img's counters (``corruptions``, ``leaks``, ``check-errors``, ...); 0 when
        absent, as qemu-img leaves zero counters out."""
        return int(self.record.get(key, 0))


def worst_exit_code(results: Iterable[FleetResult]) -> int:
    """``qemu-img check``'s exit status for the worst image (0 when there is none): 1 (an image
    not checked, or check errors) before 2 (corruptions) before 3 (leaks) before 63 (not
    supported) before 0."""
    worst = 0
    for r in results:
        if _RANK.get(r.exit_code, 4) > _RANK.get(worst, 4):
            worst = r.exit_code if r.exit_code in _RANK else EXIT_FAILED
    return worst


def sort_worst_first(results: Iterable[FleetResult]) -> list[FleetResult]:
    """Worst first (by :attr:`FleetResult.severity`, then corruptions, leaks), then by name."""
    return sorted(
        results,
        key=lambda r: (
            -r.severity,
            -r.count("corruptions"),
            -r.count("leaks"),
            r.filename,
            r.host,
        ),
    )


# ---- running the checks ------------------------------------------------------------------


def _default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _as_list(paths: PathArg | Iterable[PathArg]) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return [os.fspath(p) for p in paths]


def iter_check(
    paths: PathArg | Iterable[PathArg],
    *,
    client: Any = None,
    jobs: int | None = None,
    repair: str | None = None,
    force_share: bool = False,
    progress: Progress | None = None,
) -> Iterator[FleetResult]:
    """Check every image *paths* names (files, directories, globs: :func:`expand_paths`),
    yielding each result as it arrives.

    Without *client*: on a local pool of *jobs* worker processes (default: one per CPU this
    process may run on). With *client* (a ``distributed.Client``, or a scheduler address such as
    ``"tcp://host:8786"``, for which a client is made and closed): one Dask task per image. On
    a cluster a path written ``HOST:/PATH`` is expanded and checked by a worker on HOST (the
    host part of the worker's address, or its name); other paths are expanded here and may be
    checked by any worker (one host, or storage every worker mounts at the same path).

    *repair* (``"leaks"`` or ``"all"``) and *force_share* are those of ``qcow2ovl check``
    (``-r``, ``-U``). *progress* is called with ``(done, total)`` after each result.

    The local pool starts its workers as fresh interpreters (multiprocessing's ``spawn``), which
    import the calling script's main module: call this from a script under ``if __name__ ==
    "__main__":``.
    """
    _core.check_repair_mode(repair)
    if repair is not None and force_share:
        raise ValueError("force-share=on can only be used with read-only images")
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    arguments = _as_list(paths)
    total = [0]
    results: Iterator[dict[str, Any]]
    if client is None:
        images = expand_paths(arguments)
        total[0] = len(images)
        results = _run_pool(images, repair, force_share, jobs or _default_jobs())
    else:
        from qcow2ovl import _fleet_dask

        def set_total(n: int) -> None:
            total[0] = n

        results = _fleet_dask.run(client, arguments, repair, force_share, set_total)
    done = 0
    for record in results:
        done += 1
        if progress is not None:
            progress(done, total[0])
        yield FleetResult.from_record(record)


def check(
    paths: PathArg | Iterable[PathArg],
    client: Any = None,
    jobs: int | None = None,
    *,
    repair: str | None = None,
    force_share: bool = False,
    progress: Progress | None = None,
) -> list[FleetResult]:
    """:func:`iter_check`, all results at once, worst first (:func:`sort_worst_first`)."""
    return sort_worst_first(
        iter_check(
            paths,
            client=client,
            jobs=jobs,
            repair=repair,
            force_share=force_share,
            progress=progress,
        )
    )


def _run_pool(
    images: list[str], repair: str | None, force_share: bool, jobs: int
) -> Iterator[dict[str, Any]]:
    """Check *images* on a process pool of *jobs* workers, with two images in hand per worker
    (one running, one queued); a pool whose worker died is replaced, and the images it had in
    hand are charged one death each and tried again."""
    import multiprocessing
    from collections import deque
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    if not images:
        return
    # spawn: a fresh interpreter per worker, safe whatever threads the caller runs.
    context = multiprocessing.get_context("spawn")
    pending = deque(images)
    deaths: dict[str, int] = {}
    retry_now: list[dict[str, Any]] = []

    def charge(path: str) -> None:
        deaths[path] = deaths.get(path, 0) + 1
        if deaths[path] >= MAX_DEATHS:
            message = f"the worker checking it died {deaths[path]} times"
            retry_now.append(error_record(path, message))
        else:
            pending.appendleft(path)

    while pending:
        workers = min(jobs, len(pending))
        window = 2 * workers  # one image queued per worker hides the round trip
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            in_flight: dict[Future[dict[str, Any]], str] = {}
            broken = False
            while (pending or in_flight) and not broken:
                while pending and len(in_flight) < window:
                    path = pending.popleft()
                    try:
                        in_flight[pool.submit(check_one, path, repair, force_share)] = path
                    except BrokenProcessPool:  # broke since the last wait: not this image's
                        pending.appendleft(path)
                        break
                if not in_flight:
                    break  # a new pool
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    path = in_flight.pop(future)
                    try:
                        yield future.result()
                    except BrokenProcessPool:
                        broken = True
                        charge(path)
                if broken:
                    # Every image still in hand fails with the pool; results that came in
                    # before the death are kept.
                    for future in wait(in_flight)[0]:
                        path = in_flight.pop(future)
                        try:
                            yield future.result()
                        except BrokenProcessPool:
                            charge(path)
                yield from retry_now
                retry_now.clear()


__all__ = [
    "MAX_DEATHS",
    "FleetResult",
    "check",
    "check_one",
    "expand_paths",
    "iter_check",
    "sort_worst_first",
    "split_host",
    "worst_exit_code",
]
