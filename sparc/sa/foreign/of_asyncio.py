"""asyncio's private names that sparc.sa relies on (see the package)."""

from __future__ import annotations

from asyncio.events import _get_running_loop
from typing import Any

__all__ = ["call_connection_lost", "cancel_pending", "running_loop"]

#: The event loop running in this thread, or None. asyncio's own
#: ``_get_running_loop`` itself, not wrapped: it runs for every block, and
#: the public ``asyncio.get_running_loop()`` raises RuntimeError when no
#: loop runs, the common case of a thread's block, which costs far more
#: than this call.
running_loop = _get_running_loop


def cancel_pending(task: Any) -> bool:
    """Whether a cancellation of *task* is requested and not yet delivered
    (the task cancelled itself, or was cancelled while it ran): the Task's
    ``_must_cancel``. The public ``Task.cancelling()`` (3.11+) counts
    requests until ``uncancel()``, delivered or not."""
    return bool(getattr(task, "_must_cancel", False))


def call_connection_lost(transport: Any) -> None:
    """Finish closing *transport* whose event loop is closed: close its
    socket and tell its protocol, as the loop would have done after
    ``abort()`` (the selector transports' ``_call_connection_lost``)."""
    transport._call_connection_lost(None)
