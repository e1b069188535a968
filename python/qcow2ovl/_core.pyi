"""Type stubs for the Rust extension module ``qcow2ovl._core``."""

from collections.abc import Callable, Iterable, Iterator, Sequence
from os import PathLike
from typing import Any, Literal, final, overload

from typing_extensions import Buffer

from qcow2ovl.types import MetadataType

__all__ = [
    "KEY_SECRET_REQUIRED",
    "ExtentIterator",
    "ExtentList",
    "Image",
    "MetadataMap",
    "NaiveChecker",
    "NbdServer",
    "__version__",
    "bitmap_add",
    "bitmap_clear",
    "bitmap_enable",
    "bitmap_merge",
    "bitmap_remove",
    "check_image",
    "check_repair_mode",
    "commit_image",
    "convert_disk",
    "create_image",
    "dirty_extents",
    "locking_notice",
    "open_image",
    "open_image_fd",
    "open_image_fileobj",
    "rebase_image",
    "repair_image",
]

__version__: str
KEY_SECRET_REQUIRED: str

@final
class MetadataMap:
    """Which host clusters of a qcow2 image hold which metadata; constant-time overlap checks.

    ``check`` rounds the range out to whole clusters and returns the OR of every enabled type in
    them (plus ``MAIN_HEADER`` for a range starting in cluster 0). ``enter`` ignores an unaligned
    offset; ``remove`` rounds an unaligned range out. Under ``total_size_limit`` the map never
    under-reports: ranges it could not hold make ``check`` return every enabled type and
    ``is_exact`` return False. Every int argument out of range is a ``ValueError``.
    """

    def __new__(
        cls,
        cluster_size: int,
        *,
        enabled: int = 2047,
        total_size_limit: int | None = None,
    ) -> MetadataMap: ...
    @property
    def cluster_size(self) -> int: ...
    @property
    def enabled(self) -> MetadataType: ...
    @property
    def total_size_limit(self) -> int | None: ...
    def enter(self, offset: int, nb_clusters: int, types: int) -> None: ...
    def remove(self, offset: int, nb_clusters: int, types: int) -> None: ...
    def check(self, offset: int, size: int, ignore: int = 0) -> MetadataType: ...
    def is_exact(self, offset: int, size: int) -> bool: ...
    def unchecked_ranges(self) -> list[tuple[int, int]]: ...
    def extents(self) -> list[tuple[int, int, MetadataType]]: ...
    def memory_usage(self) -> int: ...
    def __len__(self) -> int: ...

@final
class NaiveChecker:
    """QEMU's scanning overlap check over in-memory tables; the reference oracle.

    With ``INACTIVE_L2`` enabled every check reads each snapshot's L1 table from ``image``
    (bytes) or ``image_path`` (a file), as QEMU does.
    """

    def __new__(
        cls,
        cluster_size: int,
        *,
        enabled: int = 2047,
        l1_table_offset: int = 0,
        l1_table: Iterable[int] = (),
        refcount_table_offset: int = 0,
        refcount_table: Iterable[int] = (),
        snapshots_offset: int = 0,
        snapshots_size: int = 0,
        snapshots: Iterable[tuple[int, int]] = (),
        bitmap_directory: tuple[int, int] | None = None,
        bitmap_tables: Iterable[tuple[int, int]] = (),
        crypto_header: tuple[int, int] | None = None,
        image: bytes | None = None,
        image_path: str | PathLike[str] | None = None,
    ) -> NaiveChecker: ...
    def check(self, offset: int, size: int, ignore: int = 0) -> MetadataType: ...

@final
class ExtentList(Sequence[tuple[int, int, MetadataType]]):
    """Metadata extents held compactly in Rust; a read-only sequence of tuples."""

    def __len__(self) -> int: ...
    @overload
    def __getitem__(self, index: int, /) -> tuple[int, int, MetadataType]: ...
    @overload
    def __getitem__(self, index: slice, /) -> list[tuple[int, int, MetadataType]]: ...
    def __iter__(self) -> ExtentIterator: ...
    def __eq__(self, other: object, /) -> bool: ...

@final
class ExtentIterator(Iterator[tuple[int, int, MetadataType]]):
    """Iterator over an :class:`ExtentList`."""

    def __iter__(self) -> ExtentIterator: ...
    def __next__(self) -> tuple[int, int, MetadataType]: ...

@final
class NbdServer:
    """An NBD server bound to its socket, serving one image (see ``qcow2ovl.serve``)."""

    def __new__(
        cls,
        image: Image,
        *,
        socket: str | None = None,
        bind: str = "127.0.0.1",
        port: int = 10809,
        export_name: str = "",
        description: str | None = None,
        shared: int = 1,
        persistent: bool = False,
        handshake_timeout: float = 10.0,
        allocation_depth: bool = False,
        bitmap: str | None = None,
        discard: Literal["ignore", "unmap"] = "ignore",
        detect_zeroes: Literal["off", "on", "unmap"] = "off",
        listen_fd: int | None = None,
    ) -> NbdServer: ...
    @property
    def port(self) -> int | None: ...
    def serve(self) -> None: ...
    def stop(self) -> None: ...

@final
class Image:
    """An open image (wrapped by ``qcow2ovl.Image``)."""

    @property
    def virtual_size(self) -> int: ...
    @property
    def cache_tables(self) -> int: ...
    @property
    def writable(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    def luks_info(self) -> dict[str, Any] | None: ...
    def info(self) -> dict[str, object]: ...
    def snapshots(self) -> list[dict[str, object]]: ...
    def create_snapshot(
        self, name: str, id: str | None = None, vm_state_size: int | None = None
    ) -> dict[str, object]: ...
    def delete_snapshot(self, name_or_id: str) -> dict[str, object]: ...
    def apply_snapshot(self, name_or_id: str) -> dict[str, object]: ...
    def bitmaps(self) -> list[dict[str, object]]: ...
    def check_overlap(self, offset: int, size: int, ignore: int | None = None) -> MetadataType: ...
    def metadata_extents(self) -> ExtentList: ...
    def map_memory_usage(self) -> int: ...
    def unchecked_ranges(self) -> list[tuple[int, int]]: ...
    def enabled(self) -> MetadataType: ...
    def problems(self) -> tuple[tuple[list[str], list[tuple[str, int, int, str]]], int]: ...
    def read(self, offset: int, length: int) -> bytes: ...
    def readinto(self, offset: int, buffer: Buffer) -> int: ...
    def write(self, offset: int, data: Buffer) -> int: ...
    def write_compressed(self, offset: int, data: Buffer) -> bool: ...
    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def resize(self, size: int) -> None: ...
    def open_backing_chain(self) -> None: ...
    def flush(self) -> None: ...
    def guest_map(
        self,
    ) -> tuple[list[str], list[tuple[int, int, int, bool, bool, bool, bool, int | None]]]: ...
    def guest_map_chunk(
        self, start: int, max: int
    ) -> tuple[list[tuple[int, int, int, bool, bool, bool, bool, int | None]], int]: ...
    def host_offset(self, offset: int) -> int | None: ...
    def close(self) -> None: ...
    def abandon(self) -> bool: ...

def open_image(
    path: str | PathLike[str],
    *,
    writable: bool = False,
    enabled: int | None = None,
    map_memory_limit: int | None = None,
    cache_size: int | None = None,
    snapshot: str | None = None,
    locking: str = "auto",
    force_share: bool = False,
    metadata_only: bool = False,
    cache_mode: str = "writeback",
    secret: str | bytes | None = None,
) -> Image: ...
def locking_notice(mode: str) -> str | None: ...
def convert_disk(
    source: Image | str | PathLike[str],
    target: Image | str | PathLike[str],
    *,
    compress: bool = False,
    min_sparse: int = 4096,
    target_is_zero: bool = True,
    target_has_backing: bool = False,
    source_layers: int | None = None,
    parallel: int = 8,
    out_of_order: bool = False,
    force_share: bool = False,
    cache: str = "unsafe",
    progress: Callable[[int, int], object] | None = None,
) -> dict[str, int]: ...
def commit_image(
    image: str | PathLike[str],
    *,
    base: str | None = None,
    keep_top: bool = False,
    cache: str = "writeback",
    locking: str = "auto",
    progress: Callable[[int, int], object] | None = None,
) -> dict[str, int | str]: ...
def rebase_image(
    image: str | PathLike[str],
    backing: str | None,
    *,
    backing_format: str | None = None,
    header_only: bool = False,
    compress: bool = False,
    cache: str = "writeback",
    backing_cache: str = "writeback",
    force_share: bool = False,
    locking: str = "auto",
    progress: Callable[[int, int], object] | None = None,
) -> dict[str, int]: ...
def open_image_fd(
    fd: int,
    name: str,
    *,
    writable: bool = False,
    enabled: int | None = None,
    map_memory_limit: int | None = None,
    cache_size: int | None = None,
    snapshot: str | None = None,
    locking: str = "auto",
    force_share: bool = False,
    secret: str | bytes | None = None,
) -> Image: ...
def open_image_fileobj(
    file: object,
    name: str,
    *,
    writable: bool = False,
    enabled: int | None = None,
    map_memory_limit: int | None = None,
    cache_size: int | None = None,
    snapshot: str | None = None,
    locking: str = "auto",
    force_share: bool = False,
    secret: str | bytes | None = None,
) -> Image: ...
def create_image(
    path: str | PathLike[str],
    size: int,
    *,
    cluster_size: int | None = None,
    version: int = 3,
    refcount_bits: int | None = None,
    extended_l2: bool = False,
    lazy_refcounts: bool = False,
    compression_type: str = "zlib",
    backing_file: str | None = None,
    backing_format: str | None = None,
    data_file: str | None = None,
    data_file_raw: bool = False,
    preallocation: str = "off",
    overwrite: bool = False,
    locking: str = "auto",
    encrypt: dict[str, object] | None = None,
) -> None: ...
def check_image(
    image: Image, progress: Callable[[int, int], object] | None = None, details: bool = True
) -> dict[str, Any]: ...
def repair_image(path: str | PathLike[str], mode: str) -> dict[str, Any]: ...
def check_repair_mode(mode: object) -> None: ...
def dirty_extents(
    image: Image, name: str, offset: int = 0, length: int | None = None
) -> list[tuple[int, int]]: ...
def bitmap_add(
    image: Image, name: str, granularity: int | None = None, enabled: bool = True
) -> None: ...
def bitmap_remove(image: Image, name: str) -> None: ...
def bitmap_clear(image: Image, name: str) -> None: ...
def bitmap_enable(image: Image, name: str, enabled: bool) -> None: ...
def bitmap_merge(
    image: Image, target: str, source: str, source_image: Image | None = None
) -> None: ...
