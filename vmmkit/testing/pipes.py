"""Reading a child process's output against a deadline.

A guest that hangs silently sends nothing: a plain read would wait for the
next byte for ever, so every wait here is on the pipe with the time left.
"""

from __future__ import annotations

import os
import select
import time
from typing import Callable, Optional


def read_until(pipe, deadline: float, feed: Callable[[bytes], object],
               done: Optional[Callable[[], bool]] = None) -> bool:
    """Give *pipe*'s bytes to *feed* as they come, until its end, until *done()* is true, or *deadline*.

    *deadline* is a ``time.monotonic()`` value. Returns False when the deadline
    came first, True otherwise. The process is neither killed nor waited for:
    that is the caller's choice.
    """
    fd = pipe.fileno()
    while done is None or not done():
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return False
        chunk = os.read(fd, 65536)
        if not chunk:
            return True
        feed(chunk)
    return True
