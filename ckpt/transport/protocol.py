"""The migration protocol's messages: types, size caps, and their payload encodings.

Every message is a frame `type (1 byte) | length (4 bytes, big endian) | payload`
(after the handshake channel.py encrypts the payload and appends the AEAD tag, or
with --insecure-cleartext an HMAC tag). Before authentication only the handshake
messages are accepted, and none longer than PREAUTH_MAX. Control payloads are
msgpack maps whose keys and value types are checked here against a schema, so a
peer can never make the other side index a missing key or allocate by a length
it chose: every length read from the wire is capped per message type before
anything is read.

Page chunks are binary (msgpack would copy them): a fixed header, the run table,
then one zstd frame whose crc32 the header carries (the same codec and checksum
as image chunks, see ckpt/image/codec.py). docs/MIGRATION.md has the full
message sequence.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import msgpack
import zstandard

from ..errors import ImageCorrupt
from ..image import MAX_STATE_BYTES
from ..image.codec import decompress
from ..model import SLOT_SHIFT, Vma, from_dict
from ..units import PAGE_SIZE
from .errors import ProtocolError

PREAMBLE = b"CKPTMIG\x02"  # sent first by both sides: "I speak ckpt migration, version 2"
VERSION = 2  # 2: frames encrypted by default (AES-256-GCM keyed from the token)

# message types
HELLO = 0x01  # both: {version, role, nonce, cipher, ckpt, host, kernel}
PROOF = 0x02  # both: {mac}
REFUSED = 0x03  # either: {reason, [code]}; authentication or compatibility refused, then close
LAYER_BEGIN = 0x10  # source: {layer, [pid, vmas]}; the round's VMA layout (staged restore)
PAGES = 0x11  # source: binary page chunk
LAYER_END = 0x12  # source: {layer, pages, chunks}
FROZEN = 0x13  # source: {frozen_for_ms}; the final round started (no clock value)
STATE = 0x14  # source: {state, meta}; the image is complete
ABORT = 0x15  # source: {reason}; the migration is off, the source keeps its process
DONE = 0x16  # source: {}; the source's copy is gone
RUNNING = 0x20  # destination: {pid, destination_ms, commit_ms, restore_ms, [parts]}
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
MAX_LAYOUT = 16 << 20  # a LAYER_BEGIN with the VMA list (65530 VMAs at most, ~250 bytes each)
PREAUTH_MAX = 4 << 10  # any frame before the peer proved the token (HELLO, PROOF, REFUSED)
HANDSHAKE_TYPES = frozenset({HELLO, PROOF, REFUSED})

# Frame protection after the handshake (HELLO's cipher; both sides must agree).
CIPHER_AEAD = "aes-256-gcm"  # default: payload encrypted, header authenticated
CIPHER_CLEAR = "none"  # --insecure-cleartext: payload in the clear, frame HMAC-SHA256-tagged
CIPHERS = (CIPHER_AEAD, CIPHER_CLEAR)

# The largest payload accepted per type; anything bigger is refused before reading it.
MAX_PAYLOAD = {
    PAGES: _CHUNK_HEAD.size + (MAX_CHUNK_ULEN // PAGE_SIZE) * _RUN.size
    + MAX_CHUNK_ULEN + _MAX_FRAME_OVERHEAD,
    STATE: MAX_STATE_BYTES,
    LAYER_BEGIN: MAX_LAYOUT,
}  # fmt: skip
TASK_SIZE = 0x7FFFFFFFF000

# control message schemas: key -> accepted types
_SCHEMA: dict[int, dict[str, tuple[type, ...]]] = {
    HELLO: {"version": (int,), "role": (str,), "nonce": (bytes,), "cipher": (str,),
            "ckpt": (str,), "host": (str,), "kernel": (str,)},
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

# optional keys (absent from older peers): key -> accepted types
_OPTIONAL: dict[int, dict[str, tuple[type, ...]]] = {
    REFUSED: {"code": (int,)},  # the exit code the refused side should use (default 20)
    LAYER_BEGIN: {"pid": (int,), "vmas": (list,)},
    RUNNING: {"parts": (dict,)},
}


def max_payload(mtype: int) -> int:
    return MAX_PAYLOAD.get(mtype, MAX_CONTROL)


def name(mtype: int) -> str:
    return NAMES.get(mtype, f"type 0x{mtype:02x}")


def encode(mtype: int, **fields: Any) -> bytes:
    """A control payload (checked against the schema, so both sides agree)."""
    want = _SCHEMA[mtype]
    extra = set(fields) - set(want)
    if not set(want) <= set(fields) or not extra <= set(_OPTIONAL.get(mtype, ())):
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
    for key, types in _OPTIONAL.get(mtype, {}).items():
        value = obj.get(key)
        if key in obj and (not isinstance(value, types) or isinstance(value, bool)):
            raise ProtocolError(f"{name(mtype)} message: field {key!r} is malformed")
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


@dataclass(frozen=True)
class RawChunk:
    """A page chunk whose header and run table are checked; the frame is not inflated yet."""

    layer: int
    runs: list[tuple[int, int]]
    frame: memoryview
    ulen: int
    crc: int

    def check(self) -> None:
        """The checksum and the declared size, without inflating (the frame is stored)."""
        where = f"page chunk of layer {self.layer}"
        if zlib.crc32(self.frame) != self.crc:
            raise ProtocolError(f"{where}: checksum mismatch")
        try:
            size = zstandard.frame_content_size(self.frame)
        except zstandard.ZstdError as exc:
            raise ProtocolError(f"{where}: bad zstd frame header ({exc})") from None
        if size != self.ulen:
            raise ProtocolError(f"{where}: frame holds {size} bytes, header says {self.ulen}")

    def inflate(self) -> bytes:
        """Checksum, then decompress (safe to call from a pool thread)."""
        try:
            return decompress(self.frame, self.ulen, self.crc, f"page chunk of layer {self.layer}")
        except ImageCorrupt as exc:
            raise ProtocolError(str(exc)) from None


def decode_chunk(payload: bytes | bytearray | memoryview) -> Chunk:
    """Check the header and run table against each other, then the checksum, then inflate."""
    raw = parse_chunk(payload)
    return Chunk(raw.layer, raw.runs, raw.inflate())


def parse_chunk(payload: bytes | bytearray | memoryview) -> RawChunk:
    """Check the header and run table against each other (the frame is checked later)."""
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
        # a page key is slot << 48 | vaddr (slot: a process of a tree, model.slot_base)
        low = vaddr & ((1 << SLOT_SHIFT) - 1)
        if vaddr % PAGE_SIZE or npages == 0 or low + npages * PAGE_SIZE > TASK_SIZE:
            raise ProtocolError(f"page chunk run (0x{vaddr:x}, {npages}) is not a user range")
        runs.append((vaddr, npages))
        total += npages
    if total * PAGE_SIZE != ulen:
        raise ProtocolError(f"page chunk runs cover {total} pages but it holds {ulen} bytes")
    return RawChunk(layer, runs, mv[table_end:], ulen, crc)


# ---------------------------------------------------------------- VMA layouts

_KINDS = ("anon", "file", "shmem", "heap", "stack", "vdso", "vvar", "vvar_vclock")


def encode_layout(vmas: list[Vma]) -> list[dict]:
    """A round's VMA list for LAYER_BEGIN (model.Vma fields, without the present map)."""
    out = []
    for v in vmas:
        d = dataclasses.asdict(v)
        d.pop("present", None)
        out.append(d)
    return out


def decode_layout(items: list) -> list[Vma]:
    """Rebuild and check a LAYER_BEGIN's VMA list: page aligned, user space, sorted,
    not overlapping, known kinds, a file identity for file mappings."""
    vmas: list[Vma] = []
    last_end = 0
    for d in items:
        try:
            if not isinstance(d, dict):
                raise TypeError("not a map")
            v = from_dict(Vma, d)
            ok = (
                isinstance(v.start, int) and isinstance(v.end, int) and isinstance(v.prot, int)
                and isinstance(v.offset, int) and isinstance(v.kind, str)
                and isinstance(v.name, str) and isinstance(v.vmflags, list)
                and all(isinstance(f, str) for f in v.vmflags)
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"malformed VMA in a layer's layout ({exc})") from None
        if not ok or v.kind not in _KINDS or (v.kind == "file") != (v.file is not None):
            raise ProtocolError(f"malformed VMA {d.get('start', '?')!r} in a layer's layout")
        if v.start % PAGE_SIZE or v.end % PAGE_SIZE or not last_end <= v.start < v.end:
            raise ProtocolError(f"VMA 0x{v.start:x}-0x{v.end:x} out of order or not page aligned")
        if v.end > TASK_SIZE or not 0 <= v.prot <= 7 or v.offset < 0:
            raise ProtocolError(f"VMA 0x{v.start:x}-0x{v.end:x} is not a user mapping")
        if v.file is not None and not (
            isinstance(v.file.path, str) and v.file.path.startswith("/")
        ):
            raise ProtocolError(f"VMA 0x{v.start:x}-0x{v.end:x}: bad file reference")
        last_end = v.end
        vmas.append(v)
    return vmas
