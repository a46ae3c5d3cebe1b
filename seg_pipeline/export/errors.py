"""The two errors an export raises, in a leaf module so every export module can raise them.

:class:`ExportError` is a ``ValueError`` (bad checkpoint or arguments: fix the call);
:class:`ExportParityError` a ``RuntimeError`` (an exported file disagrees with the eager model).
"""

from __future__ import annotations


class ExportError(ValueError):
    """The checkpoint or the export arguments cannot produce an export."""


class ExportParityError(RuntimeError):
    """An exported format disagrees with the eager model by more than its tolerance."""
