"""What decoding a msgpack document would cost in memory, found before decoding it.

A state file or layer index is one msgpack document. Its checksum proves only that its
bytes are the ones written, and msgpack turns each byte of an empty map, an empty list
or a short string into a whole Python object: a hostile 32 MiB state decoded into
2.4 GB. decode_cost() walks the document (one pass, no recursion: a stack of the values
still expected at each depth) and adds up an upper bound of the memory CPython objects
for it take, so blob.decode() can refuse before decoding.

The estimate, in bytes (64-bit CPython 3.10+): a list of n is 56 + 8n; a dict of n is
232 + 48n (64 empty); an int outside the small-int cache (-5..256) 36; a float 24; a
str of more than 1 byte 80 + len (UTF-8 never decodes into more than len code units,
and PEP 393 stores at most 4 bytes each); bytes of more than 1 byte 33 + len; an ext
value 128 + len; nil, booleans, cached ints and 0/1-byte strings and bytes nothing
(shared objects). None for a document that is truncated, has bytes after it, uses the
reserved type 0xc1 or nests deeper than MAX_DEPTH.

decode_cost is ckpt's C walk (native/areas/msgscan.py, through ckpt/accel.py) where the
compiled extension loads, else decode_cost_py below: the same rules, the same answers
(tests/test_image_plain.py), in Python.
"""

from __future__ import annotations

from .. import accel

MAX_DEPTH = 1024

# type byte → (bytes after it, cost) for the values of fixed size
_FIXED: dict[int, tuple[int, int]] = {t: (0, 0) for t in range(0x80)}  # positive fixint
_FIXED.update({t: (0, 36 if t - 256 < -5 else 0) for t in range(0xE0, 0x100)})  # negative
_FIXED.update({0xC0: (0, 0), 0xC2: (0, 0), 0xC3: (0, 0)})  # nil, false, true
_FIXED.update({0xCA: (4, 24), 0xCB: (8, 24)})  # float 32, 64
_FIXED.update({0xCC: (1, 0), 0xCD: (2, 36), 0xCE: (4, 36), 0xCF: (8, 36)})  # uint
_FIXED.update({0xD0: (1, 36), 0xD1: (2, 36), 0xD2: (4, 36), 0xD3: (8, 36)})  # int
_FIXED.update({0xD4: (2, 128), 0xD5: (3, 128), 0xD6: (5, 128), 0xD7: (9, 128), 0xD8: (17, 128)})

_STR, _BIN, _EXT, _ARRAY, _MAP = range(5)
# type byte → (kind, length bytes after it) for the values that carry a length
_SIZED: dict[int, tuple[int, int]] = {
    0xC4: (_BIN, 1), 0xC5: (_BIN, 2), 0xC6: (_BIN, 4),
    0xC7: (_EXT, 1), 0xC8: (_EXT, 2), 0xC9: (_EXT, 4),
    0xD9: (_STR, 1), 0xDA: (_STR, 2), 0xDB: (_STR, 4),
    0xDC: (_ARRAY, 2), 0xDD: (_ARRAY, 4), 0xDE: (_MAP, 2), 0xDF: (_MAP, 4),
}  # fmt: skip


def decode_cost_py(buf) -> int | None:
    """Upper bound of the bytes CPython objects for the document take, or None when it
    is not one well-formed msgpack document."""
    data = bytes(buf)
    size = len(data)
    if size == 0:
        return None
    fixed, sized = _FIXED, _SIZED
    left = [1]  # left[d]: values still expected at depth d (depth 0: the document)
    pos = cost = 0
    while left:
        if not left[-1]:
            left.pop()
            continue
        left[-1] -= 1
        if pos >= size:
            return None
        t = data[pos]
        pos += 1
        f = fixed.get(t)
        if f is not None:
            pos += f[0]
            cost += f[1]
            if pos > size:
                return None
            continue
        if t <= 0x8F:
            kind, n = _MAP, t & 0x0F
        elif t <= 0x9F:
            kind, n = _ARRAY, t & 0x0F
        elif t <= 0xBF:
            kind, n = _STR, t & 0x1F
        else:
            s = sized.get(t)
            if s is None:  # 0xc1, never used
                return None
            kind, hdr = s
            if pos + hdr > size:
                return None
            n = int.from_bytes(data[pos : pos + hdr], "big")
            pos += hdr
        if kind <= _EXT:
            if kind == _EXT:
                pos += 1  # the ext type byte
            if pos > size or n > size - pos:
                return None
            pos += n
            if kind == _EXT:
                cost += 128 + n
            elif n > 1:
                cost += (80 if kind == _STR else 33) + n
            continue
        if kind == _ARRAY:
            items = n
            cost += 56 + 8 * n
        else:
            items = 2 * n
            cost += 232 + 48 * n if n else 64
        # every value takes at least one byte: more than what is left is truncated
        if items > size - pos:
            return None
        if items:
            if len(left) - 1 == MAX_DEPTH:
                return None
            left.append(items)
    return cost if pos == size else None


decode_cost = accel.msgpack_cost or decode_cost_py
