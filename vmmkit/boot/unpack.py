"""Take the ELF vmlinux out of a bzImage: for booting the same kernel the ELF way.

A bzImage carries its kernel as a compressed payload (the setup header's
``payload_offset`` and ``payload_length``, counted from the protected-mode
code). Debian's kernels compress it with LZ4 in the "legacy" frame that
``lz4 -l`` writes: a magic number, then blocks of at most 8 MiB each behind a
little-endian compressed size; the kernel's build appends the uncompressed
size as a last 32-bit word. What comes out is the stripped ELF vmlinux the
bzImage's own decompressor would parse (with relocation data after it, which
ELF loaders ignore).

Only LZ4 is handled, through the ``lz4`` package (``pip install lz4``; the
test extra has it); gzip payloads come out through the standard library.
"""

from __future__ import annotations

import struct
import zlib

from .kernel import BootError

_LZ4_LEGACY_MAGIC = 0x184C2102
_LZ4_LEGACY_BLOCK = 8 << 20
_GZIP_MAGIC = b"\x1f\x8b"


def payload(bzimage: bytes) -> bytes:
    """The compressed kernel inside a bzImage, as its setup header locates it."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise BootError("not a bzImage: no setup header")
    setup_sects = bzimage[0x1f1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if not length or start + length > len(bzimage):
        raise BootError(f"bzImage payload {start:#x}+{length:#x} lies outside the file ({len(bzimage):#x} bytes)")
    return bzimage[start:start + length]


def _lz4_legacy(data: bytes) -> bytes:
    try:
        import lz4.block
    except ImportError:
        raise BootError("unpacking an LZ4 kernel needs the lz4 package: pip install lz4") from None
    # The build appends the uncompressed size; blocks run up to it.
    end = len(data) - 4
    total = struct.unpack_from("<I", data, end)[0]
    out = []
    pos = 4
    while pos + 4 <= end:
        size = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if size == _LZ4_LEGACY_MAGIC:
            continue  # concatenated frames
        if pos + size > end:
            raise BootError(f"LZ4 block at {pos - 4:#x} ({size} bytes) runs past the payload")
        out.append(lz4.block.decompress(data[pos:pos + size], uncompressed_size=_LZ4_LEGACY_BLOCK))
        pos += size
    image = b"".join(out)
    if len(image) != total:
        raise BootError(f"LZ4 payload unpacked to {len(image)} bytes; the kernel says {total}")
    return image


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF vmlinux inside *bzimage* (LZ4 or gzip payloads); :class:`BootError` otherwise."""
    data = payload(bzimage)
    if struct.unpack_from("<I", data, 0)[0] == _LZ4_LEGACY_MAGIC:
        image = _lz4_legacy(data)
    elif data[:2] == _GZIP_MAGIC:
        # One gzip member; the size word the build appends after it is not another member.
        image = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    else:
        raise BootError(f"bzImage payload compression not handled (magic {data[:4].hex()}); LZ4 and gzip are")
    if image[:4] != b"\x7fELF":
        raise BootError("the unpacked bzImage payload is not an ELF vmlinux")
    return image
