"""What decoding a msgpack document would cost in memory, before decoding it
(native/areas/msgscan.py walks it in C, allocating nothing)."""

from __future__ import annotations

from .native import ffi, lib


def decode_cost(buf: bytes | memoryview) -> int | None:
    """Upper bound of the bytes CPython objects for the document take, or None when it
    is not one well-formed msgpack document (truncated, trailing bytes, reserved type,
    nested deeper than 1024)."""
    n = len(buf)
    if n == 0:
        return None
    cost = lib.ck_msgpack_cost(ffi.from_buffer(buf), n)
    return None if cost < 0 else cost
