"""qcow2ovl: qcow2 metadata maps and constant-time metadata overlap checks.

The Rust core (``qcow2ovl._core``) scans every metadata structure of a qcow2 image into a compact
metadata map and answers "would this write hit metadata, and which?" in constant time. This
package is its Python face: the types and options of the checks, the map, and the CLI.
"""

from qcow2ovl._core import MetadataMap, NaiveChecker, __version__
from qcow2ovl.errors import FormatError, MetadataOverlapError, Qcow2Error, UnsupportedError
from qcow2ovl.options import OverlapCheck
from qcow2ovl.types import TEMPLATES, MetadataType

__all__ = [
    "TEMPLATES",
    "FormatError",
    "MetadataMap",
    "MetadataOverlapError",
    "MetadataType",
    "NaiveChecker",
    "OverlapCheck",
    "Qcow2Error",
    "UnsupportedError",
    "__version__",
]
