"""virtio-vsock wire format (virtio 1.x, 5.10): the packet header, ops, flags and events.

Every packet on the rx and tx queues starts with ``struct virtio_vsock_hdr``,
44 bytes, little-endian, then ``len`` bytes of payload (RW packets only).
"""

from __future__ import annotations

import struct

#: struct virtio_vsock_hdr: src_cid, dst_cid, src_port, dst_port, len, type, op, flags, buf_alloc, fwd_cnt.
HEADER = struct.Struct("<QQIIIHHIII")
HDR_SIZE = HEADER.size  # 44

#: The host's context ID (VMADDR_CID_HOST); CIDs 0..2 are reserved.
HOST_CID = 2
#: Guest CIDs a config may use: 3 up to (not including) VMADDR_CID_ANY (0xFFFFFFFF).
MIN_GUEST_CID = 3
MAX_GUEST_CID = 0xFFFFFFFE

# Socket types (hdr.type).
TYPE_STREAM = 1
TYPE_SEQPACKET = 2

# Operations (hdr.op).
OP_INVALID = 0
OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7
KNOWN_OPS = frozenset({OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST})

OP_NAMES = {OP_INVALID: "INVALID", OP_REQUEST: "REQUEST", OP_RESPONSE: "RESPONSE", OP_RST: "RST",
            OP_SHUTDOWN: "SHUTDOWN", OP_RW: "RW", OP_CREDIT_UPDATE: "CREDIT_UPDATE",
            OP_CREDIT_REQUEST: "CREDIT_REQUEST"}

# SHUTDOWN flags (hdr.flags): the sender will receive / send no more data.
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND

#: struct virtio_vsock_event on the event queue: a u32 id.
EVENT = struct.Struct("<I")
EVENT_TRANSPORT_RESET = 0

#: Largest payload of one packet, either way (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
MAX_PKT_PAYLOAD = 64 * 1024

U32 = 0xFFFFFFFF


def pack(src_cid: int, dst_cid: int, src_port: int, dst_port: int, op: int, *, length: int = 0,
         flags: int = 0, buf_alloc: int = 0, fwd_cnt: int = 0, type_: int = TYPE_STREAM) -> bytes:
    """One header's 44 bytes."""
    return HEADER.pack(src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc, fwd_cnt & U32)
