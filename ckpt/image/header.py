"""The fixed header that starts every file of an image, and the version rules.

Why a header outside the payload: a reader must be able to say "this file is
from a newer ckpt" or "this is not a ckpt file at all" without decoding
anything it might not understand. The first 12 bytes (magic, kind, major,
minor) are frozen for every format major that will ever exist; the rest of the
header belongs to the major version. See docs/FORMAT.md for the byte table.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from ..errors import ImageCorrupt, ImageVersionError

FORMAT_MAJOR = 1
FORMAT_MINOR = 1  # 1.1: optional state keys for threads' names, trees, spaces
# Majors this ckpt reads. 2 = the header and envelope of 1, but a state that a 1.x
# reader would restore wrongly (docs/FORMAT.md, "Major 2"): 1.x readers refuse it.
# Only state files are ever 2; layer files are 1.
# 3 = a state whose shared memory is stored by object (model.ShmObject): a 2.x reader
# would restore those mappings empty, so it must refuse it.
# 4 = a state with process attributes a 3.x reader ignores (model.ProcAttrs,
# ThreadAttrs, guard regions, sealed or droppable memory) that are not a plain
# process's: it would restore the process without them, so it must refuse it.
# 5 = a state with zombies (model.Zombie): a 4.x reader would restore the tree without
# them, and their parents' waits would find nothing.
READ_MAJORS = (1, 2, 3, 4, 5, 6)
_READ_MAJORS_OF = {b"STAT": READ_MAJORS, b"INDX": (1,), b"PAGE": (1,)}

MAGIC = b"CKPT"
KIND_STATE = b"STAT"
KIND_INDEX = b"INDX"
KIND_PAGES = b"PAGE"
KNOWN_KINDS = {KIND_STATE: "state", KIND_INDEX: "layer index", KIND_PAGES: "layer pages"}

NO_LAYER = 0xFFFFFFFF  # the `layer` field of files that belong to no layer (state)

# Frozen forever: magic, kind, major, minor.
_PREFIX = struct.Struct("<4s4sHH")
# Major 1: the prefix, then header_len .. payload_crc, 8 reserved bytes; the
# header's own crc32 always sits in its LAST 4 bytes, so newer minors can grow
# the header (header_len) without moving anything an older reader knows.
_V1 = struct.Struct("<4s4sHHI16sIIQI8x")
_CRC = struct.Struct("<I")
HEADER_LEN = _V1.size + _CRC.size  # 64 in format 1.0
MAX_HEADER_LEN = 4096
PREFIX_LEN = _PREFIX.size + 4  # enough to learn header_len


@dataclass(frozen=True)
class Header:
    """A decoded header. `ident` is the image id (state) or the layer id (layer files)."""

    kind: bytes
    major: int
    minor: int
    header_len: int
    ident: bytes
    layer: int
    payload_len: int
    payload_crc: int


def pack_header(
    kind: bytes,
    ident: bytes,
    layer: int,
    payload_len: int,
    payload_crc: int,
    *,
    major: int = FORMAT_MAJOR,
    minor: int = FORMAT_MINOR,
    extra: bytes = b"",
) -> bytes:
    """Encode a header. `extra` (bytes before the crc) exists so tests can forge newer minors."""
    if len(ident) != 16:
        raise ValueError("ident must be 16 bytes")
    header_len = HEADER_LEN + len(extra)
    body = (
        _V1.pack(MAGIC, kind, major, minor, header_len, ident, layer, 0, payload_len, payload_crc)
        + extra
    )
    return body + _CRC.pack(zlib.crc32(body))


def parse_header(data: bytes, path: str, expected_kind: bytes) -> Header:
    """Check `data` (the file's first bytes, at least the whole header) and decode it.

    The order of checks is the version policy: magic first (not ours → corrupt),
    then kind (unknown kind → a newer ckpt), then major (unknown → refuse),
    and only then the parts whose layout the major defines.
    """
    what = KNOWN_KINDS[expected_kind]
    if not data:
        raise ImageCorrupt(f"{path}: empty file (expected a ckpt {what} file)")
    if len(data) < PREFIX_LEN:
        raise ImageCorrupt(f"{path}: truncated header ({len(data)} bytes)")
    magic, kind, major, minor = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ImageCorrupt(f"{path}: not a ckpt image file (bad magic {magic!r})")
    if kind not in KNOWN_KINDS:
        raise ImageVersionError(
            f"{path}: unknown ckpt file kind {kind!r} (format {major}.{minor}): "
            "written by a newer ckpt? upgrade ckpt to read it"
        )
    if kind != expected_kind:
        raise ImageCorrupt(f"{path}: is a {KNOWN_KINDS[kind]} file, expected a {what} file")
    majors = _READ_MAJORS_OF[kind]
    if major not in majors:
        newer = "a newer" if major > max(majors) else "an older, unsupported"
        raise ImageVersionError(
            f"{path}: image format {major}.{minor} was written by {newer} ckpt; "
            f"this ckpt reads formats {', '.join(f'{m}.x' for m in majors)} of this file"
        )
    (header_len,) = struct.unpack_from("<I", data, _PREFIX.size)
    if not HEADER_LEN <= header_len <= MAX_HEADER_LEN:
        raise ImageCorrupt(f"{path}: bad header length {header_len}")
    if len(data) < header_len:
        raise ImageCorrupt(f"{path}: truncated header ({len(data)} of {header_len} bytes)")
    (crc,) = _CRC.unpack_from(data, header_len - _CRC.size)
    if zlib.crc32(data[: header_len - _CRC.size]) != crc:
        raise ImageCorrupt(f"{path}: header checksum mismatch")
    _, _, _, _, _, ident, layer, _, payload_len, payload_crc = _V1.unpack_from(data)
    return Header(kind, major, minor, header_len, ident, layer, payload_len, payload_crc)
