"""Taking the ELF vmlinux out of a bzImage: LZ4 (legacy frame) and gzip payloads, and broken ones."""

import struct
import zlib

import lz4.block as lz4_block  # the test extra has lz4
import pytest

from vmmkit.boot.kernel import BootError
from vmmkit.boot.unpack import extract_vmlinux

ELF = b"\x7fELF" + bytes(range(256)) * 40000  # ~10 MiB: more than one 8 MiB LZ4 block


def bzimage(payload: bytes, setup_sects: int = 4) -> bytes:
    head = bytearray((setup_sects + 1) * 512)
    head[0x1f1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", head, 0x248, 0x100, len(payload))
    return bytes(head) + bytes(0x100) + payload + b"trailing bytes"


def lz4_legacy(data: bytes) -> bytes:
    out = [struct.pack("<I", 0x184C2102)]
    for i in range(0, len(data), 8 << 20):
        block = lz4_block.compress(data[i:i + (8 << 20)], store_size=False)
        out.append(struct.pack("<I", len(block)) + block)
    return b"".join(out) + struct.pack("<I", len(data))


def test_lz4_payload_of_several_blocks():
    assert extract_vmlinux(bzimage(lz4_legacy(ELF))) == ELF


def test_gzip_payload_with_the_size_word_after_it():
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    payload = z.compress(ELF) + z.flush() + struct.pack("<I", len(ELF))
    assert extract_vmlinux(bzimage(payload, setup_sects=30)) == ELF


@pytest.mark.parametrize("image,message", [
    (b"MZ" + bytes(0x300), "no setup header"),
    (bzimage(b"BZh91AY&SY" + bytes(20)), "compression not handled"),
    (bzimage(lz4_legacy(b"not an elf file")), "not an ELF vmlinux"),
    (bzimage(lz4_legacy(ELF)[:-5000]), "LZ4"),
])
def test_what_is_not_a_kernel_payload_is_refused(image, message):
    with pytest.raises(BootError, match=message):
        extract_vmlinux(image)


def test_payload_outside_the_file_is_refused():
    image = bytearray(bzimage(lz4_legacy(ELF)))
    struct.pack_into("<I", image, 0x24c, len(image))
    with pytest.raises(BootError, match="outside the file"):
        extract_vmlinux(bytes(image))
