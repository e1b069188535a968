"""qcow2ovl: qcow2 metadata maps and constant-time metadata overlap checks.

The Rust core (``qcow2ovl._core``) scans every metadata structure of a qcow2 image into a compact
metadata map and answers "would this write hit metadata, and which?" in constant time. This
package is its Python face: :func:`open` and :class:`Image`, the types and options of the checks,
the map itself, QEMU's naive checker (the reference), and the CLI.
"""

from qcow2ovl._core import MetadataMap, NaiveChecker, __version__
from qcow2ovl._inspect import inspect
from qcow2ovl.check import CheckResult, check
from qcow2ovl.commit import CommitResult, commit
from qcow2ovl.compare import compare
from qcow2ovl.convert import ConvertResult, convert
from qcow2ovl.create import create
from qcow2ovl.errors import (
    BitmapError,
    CorruptImageError,
    EncryptionError,
    FormatError,
    InconsistentImageError,
    LockError,
    MetadataOverlapError,
    Qcow2Error,
    ReadOnlyImageError,
    SnapshotNotFoundError,
    UnsupportedError,
)
from qcow2ovl.image import (
    Bitmap,
    GuestExtent,
    GuestStream,
    Image,
    ImageInfo,
    Problem,
    Snapshot,
    open,
)
from qcow2ovl.measure import MeasureResult, measure
from qcow2ovl.options import OverlapCheck
from qcow2ovl.rebase import RebaseResult, rebase
from qcow2ovl.records import Verdict
from qcow2ovl.resize import resize
from qcow2ovl.serve import serve
from qcow2ovl.types import TEMPLATES, MetadataType

__all__ = [
    "TEMPLATES",
    "Bitmap",
    "BitmapError",
    "CheckResult",
    "CommitResult",
    "ConvertResult",
    "CorruptImageError",
    "EncryptionError",
    "FormatError",
    "GuestExtent",
    "GuestStream",
    "Image",
    "ImageInfo",
    "InconsistentImageError",
    "LockError",
    "MeasureResult",
    "MetadataMap",
    "MetadataOverlapError",
    "MetadataType",
    "NaiveChecker",
    "OverlapCheck",
    "Problem",
    "Qcow2Error",
    "RebaseResult",
    "ReadOnlyImageError",
    "Snapshot",
    "SnapshotNotFoundError",
    "Verdict",
    "UnsupportedError",
    "__version__",
    "check",
    "commit",
    "compare",
    "convert",
    "create",
    "inspect",
    "measure",
    "open",
    "rebase",
    "resize",
    "serve",
]
