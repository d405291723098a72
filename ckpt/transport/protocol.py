"""The migration protocol's messages: types, size caps, and their payload encodings.

Every message is a frame `type (1 byte) | length (4 bytes, big endian) | payload`
(channel.py adds the authentication tag). Control payloads are msgpack maps whose
keys and value types are checked here against a schema, so a peer can never make
the other side index a missing key or allocate by a length it chose: every
length read from the wire is capped per message type before anything is read.

Page chunks are binary (msgpack would copy them): a fixed header, the run table,
then one zstd frame whose crc32 the header carries (the same codec and checksum
as image chunks, see ckpt/image/codec.py). docs/MIGRATION.md has the full
message sequence.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from ..errors import ImageCorrupt
from ..image import MAX_STATE_BYTES
from ..image.codec import decompress
from ..kernel.native import PAGE_SIZE
from .errors import ProtocolError

PREAMBLE = b"CKPTMIG\x01"  # sent first by both sides: "I speak ckpt migration, version 1"
VERSION = 1

# message types
HELLO = 0x01  # both: {version, role, nonce, ckpt, host, kernel}
PROOF = 0x02  # both: {mac}
REFUSED = 0x03  # either: {reason}; authentication or compatibility refused, then close
LAYER_BEGIN = 0x10  # source: {layer}
PAGES = 0x11  # source: binary page chunk
LAYER_END = 0x12  # source: {layer, pages, chunks}
FROZEN = 0x13  # source: {frozen_for_ms}; the final round started (no clock value)
STATE = 0x14  # source: {state, meta}; the image is complete
ABORT = 0x15  # source: {reason}; the migration is off, the source keeps its process
DONE = 0x16  # source: {}; the source's copy is gone
RUNNING = 0x20  # destination: {pid, destination_ms, commit_ms, restore_ms}
ERROR = 0x21  # destination: {message, code}
PING = 0x22  # either: {}; keeps the peer's idle timer from firing
LAYER_ACK = 0x23  # destination: {layer}; a pre-copy layer is stored (flow control)

NAMES = {
    HELLO: "HELLO", PROOF: "PROOF", REFUSED: "REFUSED", LAYER_BEGIN: "LAYER_BEGIN",
    PAGES: "PAGES", LAYER_END: "LAYER_END", FROZEN: "FROZEN", STATE: "STATE", ABORT: "ABORT",
    DONE: "DONE", RUNNING: "RUNNING", ERROR: "ERROR", PING: "PING", LAYER_ACK: "LAYER_ACK",
}  # fmt: skip

CHUNK_BYTES = 1 << 20  # raw bytes per page chunk: small enough to pace, big enough to compress
MAX_CHUNK_ULEN = 4 << 20  # a receiver refuses chunks that would decompress to more
_CHUNK_HEAD = struct.Struct("!IIII")  # layer, nruns, ulen, crc32(zstd frame)
_RUN = struct.Struct("!QI")  # vaddr, npages
_MAX_FRAME_OVERHEAD = 64 << 10
MAX_CONTROL = 64 << 10

# The largest payload accepted per type; anything bigger is refused before reading it.
MAX_PAYLOAD = {
    PAGES: _CHUNK_HEAD.size + (MAX_CHUNK_ULEN // PAGE_SIZE) * _RUN.size
    + MAX_CHUNK_ULEN + _MAX_FRAME_OVERHEAD,
    STATE: MAX_STATE_BYTES,
}  # fmt: skip
TASK_SIZE = 0x7FFFFFFFF000

# control message schemas: key -> accepted types
_SCHEMA: dict[int, dict[str, tuple[type, ...]]] = {
    HELLO: {"version": (int,), "role": (str,), "nonce": (bytes,), "ckpt": (str,),
            "host": (str,), "kernel": (str,)},
    PROOF: {"mac": (bytes,)},
    REFUSED: {"reason": (str,)},
    LAYER_BEGIN: {"layer": (int,)},
    LAYER_END: {"layer": (int,), "pages": (int,), "chunks": (int,)},
    FROZEN: {"frozen_for_ms": (int, float)},
    STATE: {"state": (dict,), "meta": (dict,)},
    ABORT: {"reason": (str,)},
    DONE: {},
    RUNNING: {"pid": (int,), "destination_ms": (int, float), "commit_ms": (int, float),
              "restore_ms": (int, float)},
    ERROR: {"message": (str,), "code": (int,)},
    PING: {},
    LAYER_ACK: {"layer": (int,)},
}  # fmt: skip


def max_payload(mtype: int) -> int:
    return MAX_PAYLOAD.get(mtype, MAX_CONTROL)


def name(mtype: int) -> str:
    return NAMES.get(mtype, f"type 0x{mtype:02x}")


def encode(mtype: int, **fields: Any) -> bytes:
    """A control payload (checked against the schema, so both sides agree)."""
    want = _SCHEMA[mtype]
    if set(fields) != set(want):
        raise ValueError(f"{name(mtype)} takes {sorted(want)}, got {sorted(fields)}")
    return msgpack.packb(fields, use_bin_type=True)


def decode(mtype: int, payload: bytes | bytearray) -> dict[str, Any]:
    """Parse and validate a control payload; any deviation is a ProtocolError."""
    want = _SCHEMA.get(mtype)
    if want is None:
        raise ProtocolError(f"unexpected message {name(mtype)}")
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises many types
        raise ProtocolError(f"undecodable {name(mtype)} message ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{name(mtype)} message is not a map")
    for key, types in want.items():
        value = obj.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            raise ProtocolError(f"{name(mtype)} message: field {key!r} is missing or malformed")
    return obj


# ---------------------------------------------------------------- page chunks


@dataclass(frozen=True)
class Chunk:
    """One decoded page chunk: runs (vaddr, npages) lying back to back in data."""

    layer: int
    runs: list[tuple[int, int]]
    data: bytes


def encode_chunk(layer: int, runs: list[tuple[int, int]], frame: bytes, crc: int, ulen: int):
    """The PAGES payload as a list of buffers (the frame is not copied)."""
    table = b"".join(_RUN.pack(a, n) for a, n in runs)
    return [_CHUNK_HEAD.pack(layer, len(runs), ulen, crc), table, frame]


def decode_chunk(payload: bytes | bytearray | memoryview) -> Chunk:
    """Check the header and run table against each other, then the checksum, then inflate."""
    mv = memoryview(payload)
    if len(mv) < _CHUNK_HEAD.size:
        raise ProtocolError("page chunk shorter than its header")
    layer, nruns, ulen, crc = _CHUNK_HEAD.unpack_from(mv)
    if not 0 < ulen <= MAX_CHUNK_ULEN or ulen % PAGE_SIZE:
        raise ProtocolError(f"page chunk declares {ulen} bytes (not pages, or above the cap)")
    if not 0 < nruns <= ulen // PAGE_SIZE:
        raise ProtocolError(f"page chunk declares {nruns} runs for {ulen // PAGE_SIZE} pages")
    table_end = _CHUNK_HEAD.size + nruns * _RUN.size
    if len(mv) <= table_end:
        raise ProtocolError("page chunk truncated inside its run table")
    runs = []
    total = 0
    for vaddr, npages in _RUN.iter_unpack(mv[_CHUNK_HEAD.size : table_end]):
        if vaddr % PAGE_SIZE or npages == 0 or vaddr + npages * PAGE_SIZE > TASK_SIZE:
            raise ProtocolError(f"page chunk run (0x{vaddr:x}, {npages}) is not a user range")
        runs.append((vaddr, npages))
        total += npages
    if total * PAGE_SIZE != ulen:
        raise ProtocolError(f"page chunk runs cover {total} pages but it holds {ulen} bytes")
    try:
        data = decompress(mv[table_end:], ulen, crc, f"page chunk of layer {layer}")
    except ImageCorrupt as exc:
        raise ProtocolError(str(exc)) from None
    return Chunk(layer, runs, data)
