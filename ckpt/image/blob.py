"""Sealed msgpack files: header + msgpack payload, with the payload's crc32 in the header.

Used for the state file and for every layer index. Reading is defensive: the
size is capped before anything is allocated, the crc is checked before the
payload is decoded, and any decoder exception becomes ImageCorrupt, because a
hostile file must never surface as a msgpack or struct traceback.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Any

import msgpack

from ..errors import ImageCorrupt
from . import fsio
from .header import KNOWN_KINDS, MAX_HEADER_LEN, Header, pack_header, parse_header
from .msgcost import decode_cost


@dataclass(frozen=True)
class BlobInfo:
    """What the state file's layer manifest records about a written index."""

    length: int  # payload bytes
    crc: int  # crc32 of the payload


def encode(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def write_blob(
    path: str, kind: bytes, ident: bytes, layer: int, obj: Any, *, version: tuple[int, int] = (1, 0)
) -> BlobInfo:
    """Write header + msgpack(obj) to a new file (no fsync: the image writer fsyncs at commit)."""
    payload = encode(obj)
    crc = zlib.crc32(payload)
    fd = fsio.create_file(path)
    major, minor = version
    try:
        header = pack_header(kind, ident, layer, len(payload), crc, major=major, minor=minor)
        fsio.write_all(fd, header + payload)
    finally:
        os.close(fd)
    return BlobInfo(len(payload), crc)


# Memory a decode may take: what msgpack makes of a state ckpt writes is about 10 times
# its size (a page run [address, pages] is 11 bytes and ~110 of Python objects), while
# empty maps and lists take 60-100 times theirs; checked before decoding (C, one pass).
DECODE_FACTOR = 16
DECODE_BASE = 32 << 20
DECODE_CAP = 1 << 30


def decode_budget(n: int) -> int:
    return min(DECODE_CAP, DECODE_BASE + DECODE_FACTOR * n)


def decode(payload: bytes, path: str) -> Any:
    """msgpack → Python; every decoder failure is ImageCorrupt naming the file, and so
    is a payload whose objects would take more memory than decode_budget() allows."""
    cost = decode_cost(payload)
    if cost is not None and cost > decode_budget(len(payload)):
        raise ImageCorrupt(
            f"{path}: the payload would take {cost >> 20} MiB of memory to decode "
            f"({len(payload)} bytes; at most {decode_budget(len(payload)) >> 20} MiB allowed): "
            "not something ckpt writes"
        )
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises many types (ValueError, TypeError, its own…)
        raise ImageCorrupt(f"{path}: undecodable payload ({type(exc).__name__}: {exc})") from None


def read_blob(path: str, kind: bytes, *, max_len: int) -> tuple[Header, Any]:
    """Read and check a sealed msgpack file; returns its header and decoded payload."""
    what = f"{KNOWN_KINDS[kind]} file"
    fd = fsio.open_read(path, what)
    try:
        size = fsio.file_size(fd, path)
        head = fsio.read_head(fd, size, path, MAX_HEADER_LEN)
        header = parse_header(head, path, kind)
        if header.payload_len > max_len:
            raise ImageCorrupt(
                f"{path}: payload of {header.payload_len} bytes exceeds the {max_len}-byte limit"
            )
        expected = header.header_len + header.payload_len
        if size < expected:
            raise ImageCorrupt(f"{path}: truncated ({size} of {expected} bytes)")
        if size > expected:
            raise ImageCorrupt(f"{path}: {size - expected} unexpected bytes after the payload")
        payload = fsio.pread_exact(fd, header.payload_len, header.header_len, path, "payload")
    finally:
        os.close(fd)
    if zlib.crc32(payload) != header.payload_crc:
        raise ImageCorrupt(f"{path}: payload checksum mismatch")
    return header, decode(payload, path)
