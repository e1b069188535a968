"""The Dask side of :mod:`qcow2ovl.fleet`: one task per image on a ``distributed`` cluster.

``distributed`` is imported here only, when a cluster is used, and typed at this boundary: the
few methods used are described by :class:`DaskClient` and :class:`DaskFuture`.

Tasks carry paths and return the JSON line of :func:`qcow2ovl.fleet.check_one`: no image data
crosses the network. A worker that dies is the scheduler's business: it reschedules the tasks
the worker had, and fails a task (``KilledWorker``) only after ``allowed-failures`` deaths; such
a task becomes that image's error result.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from typing import Any, Protocol

    class DaskFuture(Protocol):
        key: Any

        def result(self, timeout: float | None = None) -> Any: ...

    class DaskClient(Protocol):
        loop: Any

        def submit(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> DaskFuture: ...

        def map(self, func: Callable[..., Any], *iterables: Any, **kwargs: Any) -> list[Any]: ...

        def scheduler_info(self, **kwargs: Any) -> dict[str, Any]: ...

        def close(self) -> Any: ...


def _distributed() -> Any:
    import importlib

    try:
        return importlib.import_module("distributed")
    except ImportError as exc:
        raise ImportError(
            "checks on a Dask cluster need the distributed package: pip install 'qcow2ovl[fleet]'"
        ) from exc


def _worker_hosts(client: DaskClient) -> set[str]:
    """The host part of every worker's address, and every worker's name."""
    hosts: set[str] = set()
    for address, worker in client.scheduler_info(n_workers=-1).get("workers", {}).items():
        host = str(worker.get("host") or "")
        if not host:
            host = str(address).split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
        hosts.add(host)
        if worker.get("name") is not None:
            hosts.add(str(worker["name"]))
    return hosts


def run(
    client: Any,
    arguments: Sequence[str],
    repair: str | None,
    force_share: bool,
    on_total: Callable[[int], object],
) -> Iterator[dict[str, Any]]:
    """Expand *arguments* and check every image on the cluster *client* (a ``Client`` or a
    scheduler address); yields JSON lines as they arrive."""
    from qcow2ovl._fleet_worker import check_one, error_record, expand_paths, split_host

    distributed = _distributed()
    own = isinstance(client, str)
    dask: DaskClient = (
        distributed.Client(client, timeout="30s", set_as_default=False) if own else client
    )
    try:
        groups: dict[str | None, list[str]] = {}
        for argument in arguments:
            host, path = split_host(argument)
            groups.setdefault(host, []).append(path)
        known = _worker_hosts(dask) if any(h is not None for h in groups) else set()
        unplaced: list[dict[str, Any]] = []
        listings: dict[str | None, Any] = {}
        for host, patterns in groups.items():
            if host is None:
                listings[host] = expand_paths(patterns)
            elif host not in known:
                unplaced += [
                    error_record(p, f"no Dask worker on host {host!r} to check it on")
                    for p in patterns
                ]
            else:
                # Expanded where the files are, by a worker on that host.
                listings[host] = dask.submit(
                    expand_paths,
                    patterns,
                    workers=[host],
                    allow_other_workers=False,
                    pure=False,
                )
        futures: dict[Any, str] = {}
        for host, listing in listings.items():
            images = listing if host is None else listing.result()
            placement = {} if host is None else {"workers": [host], "allow_other_workers": False}
            batch = dask.map(
                check_one,
                images,
                repair=repair,
                force_share=force_share,
                pure=False,
                key=[f"qcow2ovl-check-{_token()}" for _ in images],
                **placement,
            )
            futures.update(zip(batch, images))
        on_total(len(futures) + len(unplaced))
        yield from unplaced
        for future in distributed.as_completed(list(futures), loop=dask.loop):
            path = futures[future]
            try:
                record = future.result()
            except Exception as exc:  # noqa: BLE001 - KilledWorker and the like: a result
                record = error_record(path, f"{type(exc).__name__}: {exc}")
                record["host"] = ""
            yield dict(record)
    finally:
        if own:
            dask.close()


def _token() -> str:
    import uuid

    return uuid.uuid4().hex


__all__ = ["run"]
