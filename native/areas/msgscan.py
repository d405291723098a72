"""What decoding a msgpack document would cost, found without decoding it.

A state file or layer index is one msgpack document. Its checksum proves only that
its bytes are the ones written, and msgpack turns each byte of an empty map, an
empty list or a short string into a whole Python object: a hostile 32 MiB state
decoded into 2.4 GB. ck_msgpack_cost walks the document (one pass, no allocation,
no recursion: a counter of the values still expected) and adds up an upper bound of
the memory CPython objects for it take, so the reader can refuse before decoding.

The estimate, in bytes (64-bit CPython 3.10+): a list of n is 56 + 8n; a dict of n
is 232 + 48n (64 empty); an int outside the small-int cache (-5..256) 36; a float 24; a str of
more than 1 byte 80 + len (UTF-8 never decodes into more than len code units, and
PEP 393 stores at most 4 bytes each); bytes of more than 1 byte 33 + len; an ext
value 128 + len; nil, booleans, cached ints and 0/1-byte strings and bytes nothing
(shared objects). Returns -1 for a document that is truncated, has bytes after it,
uses the reserved type 0xc1 or nests deeper than CK_MSG_MAX_DEPTH.
"""

INCLUDES = """
#include <stdint.h>
#include <stddef.h>
"""

TYPES = """
"""

FUNCTIONS = """
long long ck_msgpack_cost(const unsigned char *buf, size_t len);
"""

CUSTOMIZATIONS = """
#define CK_MSG_MAX_DEPTH 1024

static uint64_t ck_be(const unsigned char *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

long long ck_msgpack_cost(const unsigned char *buf, size_t len)
{
    /* left[d]: values still expected at nesting depth d (depth 0: the document) */
    static __thread uint64_t left[CK_MSG_MAX_DEPTH + 1];
    int depth = 0;
    size_t pos = 0;
    unsigned long long cost = 0;
    left[0] = 1;
    while (depth >= 0) {
        if (left[depth] == 0) {
            depth--;
            continue;
        }
        left[depth]--;
        if (pos >= len)
            return -1;
        unsigned char t = buf[pos++];
        uint64_t n = 0;      /* payload bytes (str, bin, ext) */
        uint64_t items = 0;  /* values that follow (array: n, map: 2n) */
        int kind = 0;        /* 0 scalar, 1 str, 2 bin, 3 ext, 4 array, 5 map */
        int hdr = 0;         /* length bytes after the type byte */
        if (t <= 0x7f || t >= 0xe0) {
            /* fixint: -32..127; -32..-6 and 0..127 beyond 256 are not all cached */
            if (t >= 0xe0 && (signed char)t < -5)
                cost += 36;
            continue;
        } else if (t <= 0x8f) {
            kind = 5; n = t & 0x0f;
        } else if (t <= 0x9f) {
            kind = 4; n = t & 0x0f;
        } else if (t <= 0xbf) {
            kind = 1; n = t & 0x1f;
        } else {
            switch (t) {
            case 0xc0: case 0xc2: case 0xc3:
                continue;
            case 0xc1:
                return -1;
            case 0xc4: kind = 2; hdr = 1; break;
            case 0xc5: kind = 2; hdr = 2; break;
            case 0xc6: kind = 2; hdr = 4; break;
            case 0xc7: kind = 3; hdr = 1; break;
            case 0xc8: kind = 3; hdr = 2; break;
            case 0xc9: kind = 3; hdr = 4; break;
            case 0xca: pos += 4; cost += 24; break;
            case 0xcb: pos += 8; cost += 24; break;
            case 0xcc: pos += 1; break;  /* 0..255: cached small ints */
            case 0xcd: pos += 2; cost += 36; break;
            case 0xce: pos += 4; cost += 36; break;
            case 0xcf: pos += 8; cost += 36; break;
            case 0xd0: pos += 1; cost += 36; break;
            case 0xd1: pos += 2; cost += 36; break;
            case 0xd2: pos += 4; cost += 36; break;
            case 0xd3: pos += 8; cost += 36; break;
            case 0xd4: pos += 2; cost += 128; break;
            case 0xd5: pos += 3; cost += 128; break;
            case 0xd6: pos += 5; cost += 128; break;
            case 0xd7: pos += 9; cost += 128; break;
            case 0xd8: pos += 17; cost += 128; break;
            case 0xd9: kind = 1; hdr = 1; break;
            case 0xda: kind = 1; hdr = 2; break;
            case 0xdb: kind = 1; hdr = 4; break;
            case 0xdc: kind = 4; hdr = 2; break;
            case 0xdd: kind = 4; hdr = 4; break;
            case 0xde: kind = 5; hdr = 2; break;
            case 0xdf: kind = 5; hdr = 4; break;
            }
            if (pos > len)
                return -1;
            if (kind == 0)
                continue;
            if (hdr) {
                if (pos + (size_t)hdr > len)
                    return -1;
                n = ck_be(buf + pos, hdr);
                pos += hdr;
            }
        }
        switch (kind) {
        case 1: case 2: case 3:
            if (kind == 3)
                pos += 1;  /* the ext type byte */
            if (pos > len || n > len - pos)
                return -1;
            pos += n;
            if (kind == 3)
                cost += 128 + n;
            else if (n > 1)
                cost += (kind == 1 ? 80 : 33) + n;
            continue;
        case 4:
            items = n;
            cost += 56 + 8 * n;
            break;
        case 5:
            items = 2 * n;
            cost += n ? 232 + 48 * n : 64;
            break;
        }
        /* every value takes at least one byte: more than what is left is truncated */
        if (items > len - pos)
            return -1;
        if (items) {
            if (depth == CK_MSG_MAX_DEPTH)
                return -1;
            left[++depth] = items;
        }
    }
    if (pos != len)
        return -1;
    return (long long)cost;
}
"""
