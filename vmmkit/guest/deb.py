"""Reading Debian packages (.deb) without dpkg.

A .deb is an ``ar`` archive holding ``debian-binary``, ``control.tar.*`` and
``data.tar.*``. The guest and lab builders only need the data member, so this
module parses the ``ar`` container itself and hands the data tarball to
:mod:`tarfile`. Keeping it in plain Python means the builders run on any host
with apt's downloader, dpkg or not.
"""

from __future__ import annotations

import io
import os
import posixpath
import tarfile
from typing import BinaryIO, Callable, Iterator

from ..errors import VmmkitError

AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60


class DebError(VmmkitError):
    """A .deb file that cannot be read: truncated, not an ar archive, unknown compression."""


def ar_members(data: bytes, *, path: str = "<deb>") -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, content)`` for each member of an ``ar`` archive.

    Every header field is checked against the archive's length, so a damaged
    download gives a DebError naming the file instead of an IndexError.
    """
    if not data.startswith(AR_MAGIC):
        raise DebError(f"{path}: not a Debian package (no ar header)")
    pos = len(AR_MAGIC)
    while pos < len(data):
        if pos + _AR_HEADER > len(data):
            raise DebError(f"{path}: truncated ar header at offset {pos}")
        header = data[pos:pos + _AR_HEADER]
        if header[58:60] != b"`\n":
            raise DebError(f"{path}: bad ar header magic at offset {pos}")
        name = header[0:16].decode("ascii", "replace").strip()
        # GNU ar ends names with '/', BSD and dpkg's ar do not.
        name = name.rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise DebError(f"{path}: bad ar member size at offset {pos}") from None
        start = pos + _AR_HEADER
        if size < 0 or start + size > len(data):
            raise DebError(f"{path}: member {name!r} runs past the end of the file")
        yield name, data[start:start + size]
        # Members are 2-byte aligned; the pad byte is not part of the member.
        pos = start + size + (size & 1)


def open_data_tar(path: str) -> tarfile.TarFile:
    """Open the ``data.tar.*`` member of the .deb at *path* as a TarFile."""
    with open(path, "rb") as f:
        blob = f.read()
    for name, content in ar_members(blob, path=path):
        if not name.startswith("data.tar"):
            continue
        if name.endswith(".zst"):
            content = _unzstd(content, path)
            return tarfile.open(fileobj=io.BytesIO(content), mode="r:")
        try:
            # "r:*" covers .tar, .gz, .xz and .bz2: everything tarfile knows.
            return tarfile.open(fileobj=io.BytesIO(content), mode="r:*")
        except tarfile.TarError as exc:
            raise DebError(f"{path}: cannot read {name}: {exc}") from None
    raise DebError(f"{path}: no data.tar member")


def _unzstd(content: bytes, path: str) -> bytes:
    # Debian itself uses xz; zstd appears in Ubuntu's packages. Python's
    # stdlib only gained zstd in 3.14, so lean on the optional module.
    try:
        import zstandard  # type: ignore
    except ImportError:
        raise DebError(
            f"{path}: data.tar.zst needs the 'zstandard' Python package (pip install zstandard)"
        ) from None
    return zstandard.ZstdDecompressor().decompressobj().decompress(content)


def normalize(name: str) -> str:
    """Turn a tar member name (``./usr/bin/x``) into a clean relative path."""
    name = posixpath.normpath(name.lstrip("/"))
    if name.startswith("./"):
        name = name[2:]
    return "" if name == "." else name


def extract(path: str, dest: str, *, want: Callable[[str], bool] = lambda n: True) -> list[str]:
    """Extract the data members of *path* that *want* accepts into *dest*.

    Returns the relative names extracted. Members that would land outside
    *dest* (absolute paths, ``..``) are refused: packages come from a mirror we
    do not control.
    """
    done = []
    root = os.path.realpath(dest)

    def confined(name: str, shown: str) -> str:
        # Refuse '..' in the name, and a parent directory that resolves outside
        # dest through a symlink an earlier member (or package) put there.
        if name.startswith("../") or name == "..":
            raise DebError(f"{path}: member {shown!r} escapes the destination")
        full = os.path.join(dest, name)
        parent = os.path.realpath(os.path.dirname(full))
        if parent != root and not parent.startswith(root + os.sep):
            raise DebError(f"{path}: member {shown!r} escapes the destination through a symbolic link")
        return full

    def replace(target: str) -> None:
        # Never write through an existing link: remove it (or an old file) first.
        if os.path.islink(target) or (os.path.lexists(target) and not os.path.isdir(target)):
            os.unlink(target)

    with open_data_tar(path) as tar:
        for member in tar:
            rel = normalize(member.name)
            if not rel or not want(rel):
                continue
            target = confined(rel, member.name)
            if member.isdir():
                os.makedirs(target, exist_ok=True)
            elif member.issym():
                os.makedirs(os.path.dirname(target), exist_ok=True)
                replace(target)
                os.symlink(member.linkname, target)
            elif member.islnk():
                os.makedirs(os.path.dirname(target), exist_ok=True)
                src = confined(normalize(member.linkname), member.linkname)
                replace(target)
                os.link(src, target, follow_symlinks=False)
            elif member.isfile():
                os.makedirs(os.path.dirname(target), exist_ok=True)
                fobj = tar.extractfile(member)
                assert fobj is not None
                replace(target)
                with open(target, "xb") as out:
                    _copy(fobj, out)
                os.chmod(target, member.mode & 0o7777)
            else:
                continue  # device nodes and fifos are not needed by the builders
            done.append(rel)
    return done


def _copy(src: BinaryIO, dst: BinaryIO) -> None:
    while True:
        chunk = src.read(1 << 20)
        if not chunk:
            return
        dst.write(chunk)
