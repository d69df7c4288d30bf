"""Blocks held open by a suspended generator.

A generator (or async generator) that yields inside a block keeps the block
open while it is suspended. Code of the same thread or task that opens a
block meanwhile would nest in it, as a SAVEPOINT, and its work would be
rolled back later when the generator is closed early (a consumer broke out
of its loop, a client hung up on a streaming response), after that code had
seen its block end normally. So such a block is refused at its entry, with
an error that names the suspended generator.

Two cases must not be refused, and they tell the rule:

* the generator is running: a block opened by the generator's own code, or
  by anything it calls, finds the generator's frame on the current stack;
* the generator is a context manager's (``contextlib.contextmanager`` or
  ``asynccontextmanager`` around ``with tx(): yield``): it is suspended while
  the body of the ``with`` statement that entered it runs, and that body's
  blocks belong inside it. Such a generator was first resumed by contextlib,
  which is what the outermost block notes when it opens.

Only an outermost block opened directly in a generator's frame is watched:
the note costs one frame lookup per outermost block, and the check runs only
when a nested block opens inside such a block.
"""

from __future__ import annotations

import contextlib
from types import FrameType
from typing import Final

from sparc.sa.exceptions import SuspendedBlockError

__all__ = ["GENERATOR", "SuspendedBlockError", "check_owner", "owner_of_block"]

#: CO_GENERATOR | CO_ASYNC_GENERATOR: the code flags of a generator's frame
GENERATOR: Final = 0x20 | 0x200
_CONTEXTLIB: Final = contextlib.__file__


def owner_of_block(frame: FrameType) -> FrameType | None:
    """The frame to watch for an outermost block opened in *frame*: *frame*
    itself if it is a generator's that iteration drives, else None."""
    if not frame.f_code.co_flags & GENERATOR:
        return None
    resumer = frame.f_back
    if resumer is not None and resumer.f_code.co_filename == _CONTEXTLIB:
        return None  # a context manager's generator: its with-body nests
    return frame


def check_owner(owner: FrameType, frame: FrameType | None) -> None:
    """Refuse a nested block opened in *frame* unless *owner* (the frame of a
    generator holding the outermost block) is running, on *frame*'s stack."""
    while frame is not None:
        if frame is owner:
            return
        frame = frame.f_back
    code = owner.f_code
    name = getattr(code, "co_qualname", code.co_name)
    raise SuspendedBlockError(
        f"a block cannot open while the generator {name}() is suspended inside "
        f"its own block ({code.co_filename}:{owner.f_lineno}): it would nest in "
        "that block and be rolled back when the generator is closed. Finish or "
        "close the generator first, or open its block in a "
        "contextlib.(async)contextmanager whose with-statement encloses this one"
    )
