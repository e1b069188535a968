"""qcow2ovl: qcow2 metadata maps and constant-time metadata overlap checks."""

from qcow2ovl._core import __version__

__all__ = ["__version__"]
