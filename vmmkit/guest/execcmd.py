"""How a command travels to the default guest and how its output comes back.

The command goes base64-encoded in ``vmmkit.exec=`` on the kernel command line
(quotes and spaces survive; the kernel ignores dotted parameters it does not
know). The guest's /init prints START_MARKER, runs it with the console in raw
mode, and prints EXIT_MARKER followed by the status and ``]``. vmmkit and the
QEMU peer in tests and benchmarks use the same channel.
"""

from __future__ import annotations

import base64

from ..errors import VmmkitError
from ..markers import MarkerStream
from .build import EXEC_PARAM, EXIT_MARKER, START_MARKER

# x86's COMMAND_LINE_SIZE is 2048; leave room for vmmkit's own arguments.
MAX_ENCODED = 1400


def exec_param(command: str) -> str:
    """The kernel command line argument that carries *command*."""
    encoded = base64.b64encode(command.encode()).decode()
    if len(encoded) > MAX_ENCODED:
        raise VmmkitError(f"--exec command is too long ({len(command)} bytes; the kernel command line "
                          f"allows about {MAX_ENCODED * 3 // 4}): put it in a script on a disk or share instead")
    return f"{EXEC_PARAM}={encoded}"


def exec_stream(out) -> MarkerStream:
    """A console filter that forwards the command's output to *out* and catches its status."""
    return MarkerStream(out, START_MARKER.encode(), EXIT_MARKER.encode(), with_status=True)
