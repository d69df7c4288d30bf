"""zope.configuration's private names that sparc.sa relies on (see the package)."""

from __future__ import annotations

from typing import Any

__all__ = ["error_details"]


def error_details(exc: BaseException) -> Any:
    """The details zope.configuration added to *exc* (``add_details()``:
    where in which file, what failed underneath), or None."""
    return getattr(exc, "_details", None)
