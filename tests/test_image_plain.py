"""image/ and store/ are plain data code (issue 13): without ckpt.kernel or the compiled
extension they import, read, verify and write images, so `ckpt show` and `ckpt verify`
work on any machine; and their plain Python byte work (image/bufops.py,
image/msgcost.py) answers exactly as ckpt's C layer does where it loads.

The no-extension runs are subprocesses whose first act is to make every import of
ckpt._native or ckpt.kernel fail, as on a machine without them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import subprocess
import sys
import zlib

import msgpack
import pytest
from helpers import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt import accel
from ckpt.image import ImageReader, bufops, msgcost
from ckpt.store import Store
from ckpt.store.chain import present_runs
from ckpt.units import PAGE_SIZE

P = PAGE_SIZE
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NO_NATIVE = '''
import sys

class NoNative:
    """Any import of ckpt._native or of ckpt.kernel fails."""

    def find_spec(self, name, path=None, target=None):
        if name == "ckpt._native" or name == "ckpt.kernel" or name.startswith("ckpt.kernel."):
            raise ImportError(f"{name}: blocked (no compiled extension here)")
        return None

sys.meta_path.insert(0, NoNative())
'''


def run_plain(code: str, *args: str) -> str:
    """Run code after NO_NATIVE in a fresh interpreter; returns its stdout."""
    env = dict(os.environ)
    env.pop("CKPT_FAULT", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    p = subprocess.run(
        [sys.executable, "-c", NO_NATIVE + code, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p.stdout


def test_the_c_layer_is_used_where_it_loads():
    """Here the extension is built: a silent fall back to plain Python (an ImportError
    inside kernel/, say) would slow every dump and restore down."""
    assert accel.crc32 is not None and bufops.crc32 is accel.crc32
    assert bufops.nonzero_runs is accel.nonzero_runs
    assert bufops.pack_nonzero is accel.pack_nonzero
    assert bufops.gather is accel.gather
    assert msgcost.decode_cost is accel.msgpack_cost


IMPORT_ALL = """
import importlib, pkgutil, zlib
try:
    import ckpt.kernel
except ImportError:
    pass
else:
    raise SystemExit("the blocker does not block")
import ckpt.image, ckpt.image.reader, ckpt.store, ckpt.store.verify
names = []
for pkg in ("ckpt.image", "ckpt.store"):
    for m in pkgutil.iter_modules(importlib.import_module(pkg).__path__):
        if m.name != "__main__":  # runs the store CLI
            names.append(f"{pkg}.{m.name}")
            importlib.import_module(names[-1])
from ckpt import accel
from ckpt.image import bufops, msgcost
assert accel.crc32 is accel.nonzero_runs is accel.pack_nonzero is None
assert accel.gather is accel.msgpack_cost is None
assert bufops.crc32 is zlib.crc32 and bufops.pack_nonzero is bufops.pack_nonzero_py
assert msgcost.decode_cost is msgcost.decode_cost_py
loaded = sorted(k for k in sys.modules if k.startswith(("ckpt.kernel", "ckpt._native")))
print(len(names), loaded)
"""


def test_image_and_store_import_without_the_extension():
    out = run_plain(IMPORT_ALL).split(maxsplit=1)
    assert int(out[0]) >= 20, out  # every module of both packages
    assert out[1].strip() == "[]", out


def test_the_plain_lists_agree_with_the_code_that_uses_them():
    """schema.py checks a state against model.FD_KINDS and model.REG_NAMES (plain data);
    restore/ and kernel/ must handle exactly those."""
    from ckpt.kernel import ptrace
    from ckpt.model import FD_KINDS, REG_NAMES
    from ckpt.restore.fds import KINDS

    assert set(KINDS) | {"dup"} == FD_KINDS
    assert ptrace.REG_NAMES is REG_NAMES
    assert list(REG_NAMES) == [n for n, _ in ptrace.ffi.typeof("struct user_regs_struct").fields]


# What the plain process does with a real dump and a real store: read the image the way a
# restore does, verify the store deeply, and write an image of its own (add_runs with zero
# pages, add_read) that must read back the same.
READ_VERIFY_WRITE = """
import hashlib, json, os
from ckpt.image import ImageReader, ImageWriter
from ckpt.store import Store
from ckpt.store.chain import present_runs

image, store, scratch = sys.argv[1:4]

def digest(path):
    h, pages = hashlib.sha256(), {}
    with ImageReader(path) as r:
        plan = r.plan(present_runs(r.state))
        for vaddr, data in r.iter_data(plan):
            for i in range(len(data) // 4096):
                pages[vaddr + i * 4096] = bytes(data[i * 4096 : (i + 1) * 4096])
        for vaddr, n in plan.zero:
            for i in range(n):
                pages[vaddr + i * 4096] = bytes(4096)
        state = r.state
    for vaddr in sorted(pages):
        h.update(vaddr.to_bytes(8, "little") + pages[vaddr])
    return h.hexdigest(), len(pages), pages, state

got, npages, pages, state = digest(image)
report = Store.open(store).verify(deep=True)

runs = sorted(pages)
half = len(runs) // 2
with ImageWriter(scratch, chunk_bytes=1 << 20) as w:
    lw = w.begin_layer()
    lw.add_runs([(v, 1) for v in runs[:half]], b"".join(pages[v] for v in runs[:half]))
    lw.close()
    lw = w.begin_layer()
    rest = runs[half:]

    def read(batch, view):
        off = 0
        for a, n in batch:
            for i in range(n):
                view[off : off + 4096] = pages[a + i * 4096]
                off += 4096
        return batch

    lw.add_read([(v, 1) for v in rest], read)
    lw.close()
    w.commit(state, {"note": "written without the extension"})
again = digest(scratch)
print(json.dumps({"digest": got, "pages": npages, "verify_ok": report.ok,
                  "verify_chunks": report.chunks_checked, "rewritten": again[0],
                  "problems": report.problems}))
"""


def digest(path) -> str:
    """The same digest as READ_VERIFY_WRITE's, with the C layer."""
    h, pages = hashlib.sha256(), {}
    with ImageReader(path) as r:
        plan = r.plan(present_runs(r.state))
        for vaddr, data in r.iter_data(plan):
            for i in range(len(data) // P):
                pages[vaddr + i * P] = bytes(data[i * P : (i + 1) * P])
        for vaddr, n in plan.zero:
            for i in range(n):
                pages[vaddr + i * P] = bytes(P)
    for vaddr in sorted(pages):
        h.update(vaddr.to_bytes(8, "little") + pages[vaddr])
    return h.hexdigest()


def test_a_dump_reads_verifies_and_rewrites_without_the_extension(e2e):
    w = e2e.spawn("writer", "mib=4", "rate=0", "report=0")
    store = e2e.path("store")
    res = e2e.ckpt("snapshot", str(w.pid), "--store", str(store))
    assert res.returncode == 0, str(res)
    image = e2e.path("img")
    e2e.dump_ok(w, image)  # kills and reaps w
    out = json.loads(run_plain(READ_VERIFY_WRITE, str(image), str(store), str(e2e.path("img"))))
    assert out["pages"] >= 1024, out  # the 4 MiB region, at least
    assert out["digest"] == digest(image), "plain Python reads another memory than C"
    assert out["rewritten"] == out["digest"], "an image written without the extension differs"
    assert out["verify_ok"] and out["verify_chunks"] > 0, out
    assert Store.open(store).verify(deep=True).ok
    # the CLI too: `ckpt show --json` and `ckpt verify --deep` with kernel/ blocked
    cli = "import sys; from ckpt.cli import main; sys.argv[0] = 'ckpt'; main()"
    shown = json.loads(run_plain(cli, "show", str(image), "--json"))
    assert shown["process"]["pid"] == w.pid and shown["vmas"], shown
    assert "ok" in run_plain(cli, "verify", str(store), "--deep").lower()


# ---------------------------------------------------------------- the same answers


def _page(kind: int, rnd: random.Random) -> bytes:
    """0: zero; 1: one non-zero byte somewhere; 2: random; 3: non-zero last byte only."""
    if kind == 0:
        return bytes(P)
    if kind == 1:
        b = bytearray(P)
        b[rnd.randrange(P)] = rnd.randrange(1, 256)
        return bytes(b)
    if kind == 3:
        return bytes(P - 1) + b"\x01"
    return rnd.randbytes(P)


pages_st = st.lists(st.integers(0, 3), max_size=300)


@SETTINGS
@given(kinds=pages_st, seed=st.integers(0, 1 << 30))
def test_nonzero_runs_match(kinds, seed):
    rnd = random.Random(seed)
    buf = b"".join(_page(k, rnd) for k in kinds)
    n = len(kinds)
    assert bufops.nonzero_runs_py(buf, n) == accel.nonzero_runs(buf, n)
    assert bufops.nonzero_runs_py(memoryview(bytearray(buf)), n) == accel.nonzero_runs(buf, n)


@SETTINGS
@given(kinds=pages_st, cuts=st.lists(st.integers(0, 300)), seed=st.integers(0, 1 << 30))
def test_pack_nonzero_matches(kinds, cuts, seed):
    """Runs of any lengths (0 too) over the buffer, at addresses that sometimes touch."""
    rnd = random.Random(seed)
    buf = b"".join(_page(k, rnd) for k in kinds)
    bounds = sorted({0, len(kinds), *(c for c in cuts if c <= len(kinds))})
    runs, vaddr = [], 0x10000
    for s, e in itertools.pairwise(bounds):
        runs.append((vaddr, e - s))
        vaddr += (e - s + rnd.choice((0, 0, 3))) * P
    if rnd.random() < 0.2:
        runs.insert(rnd.randrange(len(runs) + 1), (vaddr, 0))
    a, b = bytearray(buf), bytearray(buf)
    recs_c, kept_c = accel.pack_nonzero(a, runs)
    recs_py, kept_py = bufops.pack_nonzero_py(b, runs)
    assert (recs_py, kept_py) == (recs_c, kept_c)
    assert b[: kept_py * P] == a[: kept_c * P]


@SETTINGS
@given(sizes=st.lists(st.integers(0, 3 * P), max_size=8), extra=st.integers(0, 2 * P))
def test_gather_matches(sizes, extra):
    rnd = random.Random(sum(sizes) + extra)
    pieces = [rnd.randbytes(n) for n in sizes]
    length = sum(sizes) + extra
    a, b = bytearray(b"\xee" * (length + 64)), bytearray(b"\xee" * (length + 64))
    accel.gather(a, pieces, length)
    bufops.gather_py(memoryview(b), [memoryview(p) for p in pieces], length)
    assert a == b


@SETTINGS
@given(data=st.binary(max_size=5000), crc=st.integers(0, (1 << 32) - 1))
def test_crc32_matches(data, crc):
    assert accel.crc32(data, crc) == zlib.crc32(data, crc)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=False, width=32)  # packs as a float 32 too
    | st.text(max_size=40)
    | st.binary(max_size=40)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=20)),
    lambda kids: (
        st.lists(kids, max_size=20) | st.dictionaries(st.text(max_size=8), kids, max_size=8)
    ),
    max_leaves=60,
)


@SETTINGS
@given(doc=msgpack_values, single_float=st.booleans())
def test_decode_cost_matches_on_documents(doc, single_float):
    raw = msgpack.packb(doc, use_bin_type=True, use_single_float=single_float)
    cost = accel.msgpack_cost(raw)
    assert cost is not None
    assert msgcost.decode_cost_py(raw) == cost
    assert msgcost.decode_cost_py(memoryview(raw)) == cost


@SETTINGS
@given(doc=msgpack_values, cut=st.integers(0, 1 << 16), junk=st.binary(max_size=3))
def test_decode_cost_matches_on_broken_documents(doc, cut, junk):
    """Truncated, with bytes after it, or bytes of no document at all: None alike."""
    raw = msgpack.packb(doc, use_bin_type=True)
    for bad in (raw[: cut % (len(raw) + 1)], raw + junk, junk, raw[::-1]):
        assert msgcost.decode_cost_py(bad) == accel.msgpack_cost(bad), bad.hex()


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",  # reserved
        b"\x91" * 1024 + b"\xc0",  # as deep as allowed
        b"\x91" * 1025 + b"\xc0",  # one deeper
        b"\xdd\xff\xff\xff\xff",  # an array of 2^32-1 in five bytes
        b"\xdf\x00\x00\x00\x02\xa0\xc0",  # a map missing its second pair
        b"\xc6\x00\x00\x00\x05abc",  # bin longer than what is left
        b"\xc7\x01",  # ext without its type byte
        msgpack.packb([{}] * 5000),
        msgpack.packb({"x": [-6, -5, 255, 256, 1.0, b"a", b"ab", "a", "ab"]}, use_bin_type=True),
    ],
)
def test_decode_cost_matches_on_edges(raw):
    assert msgcost.decode_cost_py(raw) == accel.msgpack_cost(raw)
