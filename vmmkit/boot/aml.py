"""A small ACPI Machine Language (AML) encoder: just what vmmkit's DSDT needs.

Every function returns the encoded bytes of one AML term, so a table is
built by nesting calls, the way ASL source nests::

    device("PWRB", name("_HID", eisaid("PNP0C0C")))

Section numbers refer to the ACPI 6.5 specification: chapter 20 ("ACPI
Machine Language Specification") for the term encodings and section 6.4
("Resource Data Types for ACPI") for resource descriptors.

Arguments that become data objects (``name`` values, ``package`` elements,
``lequal`` operands, ``notify`` values) accept a Python ``int`` (encoded as
the smallest integer form), a ``str`` (encoded as an AML String) or
already-encoded ``bytes``. Arguments that are object *paths* (``name``,
``scope``, ``device``, ``method``, ``notify`` targets) are ``str`` in ASL
notation, e.g. ``"\\_SB.PWRB"``.
"""

from __future__ import annotations

import struct
from typing import Union

#: An encoded AML term, or a Python value that :func:`data` turns into one.
DataLike = Union[int, str, bytes]

# Opcodes (section 20.3).
ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C  # '\'
PARENT_PREFIX_CHAR = 0x5E  # '^'
ARG0_OP = 0x68
NOTIFY_OP = 0x86
LEQUAL_OP = 0x93
IF_OP = 0xA0

# PkgLength (section 20.2.4): the lead byte's top two bits count the bytes
# that follow (0..3). A one-byte encoding holds 6 bits of length; longer
# ones keep 4 bits in the lead byte and 8 in each following byte. The
# encoded value counts the PkgLength bytes themselves.
_PKG_LENGTH_LIMITS = (1 << 6, 1 << 12, 1 << 20, 1 << 28)

_NAME_LEAD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_CHARS = _NAME_LEAD_CHARS | frozenset("0123456789")


class AmlError(ValueError):
    """A value that cannot be encoded in AML (bad name, integer out of range...)."""


def pkg_length(content_len: int) -> bytes:
    """Encode a PkgLength for ``content_len`` bytes that follow the PkgLength.

    The encoded length includes the PkgLength field itself, so the encoding
    width is chosen first and the value then grows by that width; near a
    boundary that can push the total into the next width, which the loop
    handles by trying the widths in order.
    """
    if content_len < 0:
        raise AmlError(f"negative package length {content_len}")
    for width, limit in enumerate(_PKG_LENGTH_LIMITS, start=1):
        total = content_len + width
        if total < limit:
            return _pack_pkg_length(total, width)
    raise AmlError(f"package of {content_len} bytes is too long for AML")


def _pack_pkg_length(total: int, width: int) -> bytes:
    if width == 1:
        return bytes([total])
    lead = ((width - 1) << 6) | (total & 0x0F)
    rest = total >> 4
    return bytes([lead]) + rest.to_bytes(width - 1, "little")


def _with_pkg_length(body: bytes) -> bytes:
    return pkg_length(len(body)) + body


def name_seg(seg: str) -> bytes:
    """Encode one NameSeg (section 20.2.2), padding short names with ``_``.

    ACPI names are exactly four characters: a capital letter or underscore,
    then capitals, digits or underscores. ASL pads short names (``_S5`` is
    really ``_S5_``), and so does this.
    """
    if not 1 <= len(seg) <= 4:
        raise AmlError(f"ACPI name segment {seg!r} must be 1-4 characters")
    padded = seg.ljust(4, "_")
    if padded[0] not in _NAME_LEAD_CHARS or not set(padded) <= _NAME_CHARS:
        raise AmlError(f"invalid ACPI name segment {seg!r}")
    return padded.encode("ascii")


def name_string(path: str) -> bytes:
    """Encode a NameString (section 20.2.2) written in ASL notation.

    ``"\\_SB.PWRB"`` is absolute, ``"^FOO"`` climbs one scope, ``"FOO"`` is
    relative (and searched up the scope tree when it is a single segment).
    """
    prefix = b""
    rest = path
    if rest.startswith("\\"):
        prefix, rest = bytes([ROOT_CHAR]), rest[1:]
    else:
        while rest.startswith("^"):
            prefix += bytes([PARENT_PREFIX_CHAR])
            rest = rest[1:]
    if not rest:
        return prefix + b"\x00"  # NullName: the root (or a parent) itself
    segs = [name_seg(s) for s in rest.split(".")]
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise AmlError(f"name path {path!r} has too many segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def integer(value: int) -> bytes:
    """Encode an integer constant in the shortest form (section 20.2.3).

    Zero and One have their own one-byte opcodes; larger values use the
    Byte/Word/DWord/QWord prefixes. QWords need a DSDT of revision 2 or
    later, which is what vmmkit emits. OnesOp is not used: its value depends
    on the table revision, which an explicit QWord avoids.
    """
    if not 0 <= value < 1 << 64:
        raise AmlError(f"integer {value:#x} does not fit in 64 bits")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, fmt, limit in (
        (BYTE_PREFIX, "<B", 1 << 8),
        (WORD_PREFIX, "<H", 1 << 16),
        (DWORD_PREFIX, "<I", 1 << 32),
    ):
        if value < limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    """Encode a String constant: ASCII characters 0x01-0x7F, NUL-terminated."""
    raw = text.encode("ascii")
    if b"\x00" in raw:
        raise AmlError("AML strings cannot contain NUL")
    return bytes([STRING_PREFIX]) + raw + b"\x00"


def data(value: DataLike) -> bytes:
    """Turn an int, str or already-encoded term into AML bytes."""
    if isinstance(value, bool):
        raise AmlError("use integers, not booleans, in AML")
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, str):
        return string(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise AmlError(f"cannot encode {type(value).__name__} as AML")


def package(*elements: DataLike) -> bytes:
    """Encode a Package of data objects (DefPackage, section 20.2.5.4)."""
    if len(elements) > 255:
        raise AmlError("a Package holds at most 255 elements (use VarPackage)")
    body = bytes([len(elements)]) + b"".join(data(e) for e in elements)
    return bytes([PACKAGE_OP]) + _with_pkg_length(body)


def buffer(contents: bytes) -> bytes:
    """Encode a Buffer whose size is the length of ``contents``."""
    body = integer(len(contents)) + bytes(contents)
    return bytes([BUFFER_OP]) + _with_pkg_length(body)


def name(path: str, value: DataLike) -> bytes:
    """Encode ``Name(path, value)``: a named data object."""
    return bytes([NAME_OP]) + name_string(path) + data(value)


def scope(path: str, *terms: bytes) -> bytes:
    """Encode ``Scope(path) { terms }``."""
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + _with_pkg_length(body)


def device(path: str, *terms: bytes) -> bytes:
    """Encode ``Device(path) { terms }``."""
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + _with_pkg_length(body)


def method(path: str, arg_count: int, *terms: bytes, serialized: bool = False) -> bytes:
    """Encode ``Method(path, arg_count, [Not]Serialized) { terms }``.

    MethodFlags (section 20.2.5.2): bits 0-2 argument count, bit 3
    serialized, bits 4-7 sync level (always 0 here).
    """
    if not 0 <= arg_count <= 7:
        raise AmlError(f"a method takes 0-7 arguments, not {arg_count}")
    flags = arg_count | (0x08 if serialized else 0)
    body = name_string(path) + bytes([flags]) + b"".join(terms)
    return bytes([METHOD_OP]) + _with_pkg_length(body)


def arg(index: int) -> bytes:
    """Encode a reference to method argument ``Arg<index>`` (Arg0..Arg6)."""
    if not 0 <= index <= 6:
        raise AmlError(f"Arg{index} does not exist")
    return bytes([ARG0_OP + index])


def if_(predicate: bytes, *terms: bytes) -> bytes:
    """Encode ``If (predicate) { terms }`` (no Else)."""
    body = bytes(predicate) + b"".join(terms)
    return bytes([IF_OP]) + _with_pkg_length(body)


def lequal(left: DataLike, right: DataLike) -> bytes:
    """Encode ``LEqual(left, right)``, i.e. ``left == right``."""
    return bytes([LEQUAL_OP]) + data(left) + data(right)


def notify(target: str, value: DataLike) -> bytes:
    """Encode ``Notify(target, value)``; ``target`` is an object path."""
    return bytes([NOTIFY_OP]) + name_string(target) + data(value)


def eisaid(text: str) -> int:
    """Compress a 7-character PNP id such as ``"PNP0C0C"`` like ASL's EISAID().

    Three capital letters become 5-bit values (``'A'`` = 1) packed into 15
    bits, followed by the 16-bit hexadecimal product number; the four bytes
    are stored in that order, which read as a little-endian integer gives
    the value AML carries (``"PNP0C0C"`` -> ``0x0C0CD041``).
    """
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise AmlError(f"EISA id {text!r} must be three capitals and four hex digits")
    try:
        product = int(text[3:], 16)
    except ValueError:
        raise AmlError(f"EISA id {text!r} must end in four hex digits") from None
    vendor = 0
    for ch in text[:3]:
        vendor = (vendor << 5) | (ord(ch) - 0x40)
    raw = vendor.to_bytes(2, "big") + product.to_bytes(2, "big")
    return int.from_bytes(raw, "little")


# --- Resource descriptors (section 6.4), for _CRS buffers. ---

_END_TAG = 0x79  # small item, type 0x0F, length 1
_IRQ_NO_FLAGS_TAG = 0x22  # small item, type 0x04, length 2
_IO_TAG = 0x47  # small item, type 0x08, length 7
_MEMORY32_FIXED_TAG = 0x86  # large item, type 0x06
_EXTENDED_IRQ_TAG = 0x89  # large item, type 0x09


def resource_template(*descriptors: bytes) -> bytes:
    """Encode ``ResourceTemplate() { descriptors }`` as a Buffer.

    The End Tag's checksum byte is left 0, which section 6.4.2.9 defines as
    "the resource data is treated as if the checksum operation succeeded";
    iasl emits the same.
    """
    return buffer(b"".join(descriptors) + bytes([_END_TAG, 0x00]))


def memory32_fixed(base: int, size: int, writable: bool = True) -> bytes:
    """Encode ``Memory32Fixed(ReadWrite|ReadOnly, base, size)`` (6.4.3.4)."""
    if not 0 <= base < 1 << 32 or not 0 < size <= (1 << 32) - base:
        raise AmlError(f"window {base:#x}+{size:#x} is not within 32-bit space")
    info = 0x01 if writable else 0x00
    return struct.pack("<BHBII", _MEMORY32_FIXED_TAG, 9, info, base, size)


def io(minimum: int, maximum: int, alignment: int, length: int) -> bytes:
    """Encode ``IO(Decode16, minimum, maximum, alignment, length)`` (6.4.2.5).

    Decode16 (information bit 0) says the device decodes all 16 address
    bits, which is what a VMM's port dispatch does.
    """
    if not 0 <= minimum <= maximum <= 0xFFFF:
        raise AmlError(f"I/O range {minimum:#x}-{maximum:#x} is not 16-bit")
    if not 0 <= alignment <= 0xFF or not 0 <= length <= 0xFF:
        raise AmlError("I/O alignment and length must fit in a byte")
    return struct.pack("<BBHHBB", _IO_TAG, 0x01, minimum, maximum, alignment, length)


def irq_no_flags(*irqs: int) -> bytes:
    """Encode ``IRQNoFlags() { irqs }``: ISA IRQs 0-15, edge, active high (6.4.2.1)."""
    mask = 0
    for irq in irqs:
        if not 0 <= irq <= 15:
            raise AmlError(f"ISA IRQ {irq} is not 0-15")
        mask |= 1 << irq
    return struct.pack("<BH", _IRQ_NO_FLAGS_TAG, mask)


def interrupt(
    *gsis: int,
    edge: bool = True,
    active_high: bool = True,
    shared: bool = False,
    consumer: bool = True,
) -> bytes:
    """Encode an Extended Interrupt descriptor, ASL ``Interrupt(...) { gsis }`` (6.4.3.6).

    Flags byte: bit 0 consumer, bit 1 edge-triggered, bit 2 active low,
    bit 3 shared. No ResourceSource is emitted: the numbers are GSIs of the
    platform's interrupt controller (the IOAPIC on x86).
    """
    if not 1 <= len(gsis) <= 255:
        raise AmlError("an Interrupt descriptor lists 1-255 interrupts")
    flags = (
        (0x01 if consumer else 0)
        | (0x02 if edge else 0)
        | (0 if active_high else 0x04)
        | (0x08 if shared else 0)
    )
    for gsi in gsis:
        if not 0 <= gsi < 1 << 32:
            raise AmlError(f"interrupt {gsi} does not fit in 32 bits")
    body = struct.pack(f"<BB{len(gsis)}I", flags, len(gsis), *gsis)
    return struct.pack("<BH", _EXTENDED_IRQ_TAG, len(body)) + body
