"""Moving stream bytes between guest buffers and host sockets: the one place vsock copies data.

The device decides *what* to move (which connection, how many bytes its
credit allows); a data path only moves them. :class:`PythonDataPath` is the
reference: it reads from a socket straight into the guest's rx buffers and
writes the guest's tx buffers straight to a socket (zero-copy memoryviews of
guest RAM, scatter/gather with ``recvmsg_into`` / ``sendmsg``). A native
data path (C, GIL released) plugs in here with the same three methods.

Offsets and lengths are relative to a chain's readable (tx) or writable (rx)
bytes, already bounded by the caller; the views come from
:class:`~vmmkit.virtio.queue.DescriptorChain`, which checked every buffer
against guest RAM.
"""

from __future__ import annotations

import socket

#: At most this many iovecs per sendmsg (Linux's UIO_MAXIOV is 1024).
_IOV_MAX = 1024


class PythonDataPath:
    """Copies between guest memory and sockets in Python (the reference implementation)."""

    name = "python"

    def recv_into_chain(self, memory, chain, sock: socket.socket, offset: int, max_len: int) -> int:
        """Read at most *max_len* bytes from *sock* into the chain's writable bytes at *offset*.

        Returns the count (0 at end of stream); raises ``BlockingIOError``
        when nothing is there, ``OSError`` on a socket error. The bytes
        written are dirty-tracked.
        """
        views = chain.writable_views(memory, offset, max_len)
        n = sock.recvmsg_into(views[:_IOV_MAX])[0]
        chain.mark_written(memory, offset, n)
        return n

    def send_from_chain(self, memory, chain, sock: socket.socket, offset: int, length: int) -> int:
        """Write the chain's readable bytes ``[offset, offset + length)`` to *sock*; return how many went.

        Raises ``BlockingIOError`` when the socket takes nothing, ``OSError``
        (EPIPE, ECONNRESET) when the peer is gone.
        """
        views = chain.readable_views(memory, offset, length)
        return sock.sendmsg(views[:_IOV_MAX], (), socket.MSG_NOSIGNAL)

    def copy_from_chain(self, memory, chain, offset: int, length: int) -> bytes:
        """The chain's readable bytes ``[offset, offset + length)``, copied (for a connection's tx buffer)."""
        return chain.read(memory, offset, length)

    def write_into_chain(self, memory, chain, offset: int, data: bytes) -> int:
        """Copy *data* into the chain's writable bytes at *offset* (headers, buffered bytes)."""
        return chain.write(memory, offset, data)
