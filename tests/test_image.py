"""Tests of the on-disk image format (ckpt/image/).

What they prove: round trips through several layers resolve "newest layer
wins" and "the final present map decides"; zero pages are never stored; every
kind of damage (empty, truncated, bit-flipped, forged-but-checksummed,
wrong version, wrong magic) is ImageCorrupt/ImageVersionError naming the file
(and for chunks the layer and chunk), never a bare exception; an interrupted
dump leaves nothing that reads as an image. A per-page dict is the obviously
correct reference the property tests compare against.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt.errors import (
    CkptError,
    ImageCorrupt,
    ImageExists,
    ImageNotFound,
    ImageVersionError,
)
from ckpt.image import FORMAT_MAJOR, FORMAT_MINOR, ImageReader, ImageWriter
from ckpt.image import blob as blobmod
from ckpt.image import header as hdr
from ckpt.image.layer_writer import index_name, pages_name
from ckpt.image.runs import LayerRecords, normalize, resolve
from ckpt.image.writer import STATE_NAME

PAGE = 4096
BASE = 0x7F0000000000
FAST = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# ---------------------------------------------------------------- helpers ----


def page(tag: str) -> bytes:
    """A recognisable non-zero page."""
    return (tag.encode() + b"|") * (PAGE // (len(tag) + 1)) + b"#" * (PAGE % (len(tag) + 1))


def write_image(path, layers, state=None, meta=None, mode="run", **kw) -> list:
    """layers: list of lists of (vaddr, bytes). Returns the LayerStats.

    mode "run": one add_run per run; "bytes"/"bytearray": one add_runs per layer
    with the runs back to back in one buffer (a bytearray is scribbled over after
    the call, to prove the writer copied what it kept); "read": add_read, whose
    callback copies each batch into the writer's own buffer, as a dump reads.
    """
    stats = []
    with ImageWriter(path, **kw) as w:
        for runs in layers:
            lw = w.begin_layer()
            if mode == "run":
                for vaddr, data in runs:
                    lw.add_run(vaddr, data)
            elif mode == "read":
                lw.add_read(sorted((v, len(d) // PAGE) for v, d in runs), _reader(runs))
            else:
                buf = b"".join(data for _, data in runs)
                buf = bytearray(buf) if mode == "bytearray" else buf
                lw.add_runs([(vaddr, len(data) // PAGE) for vaddr, data in runs], buf)
                if mode == "bytearray":
                    buf[:] = b"\xee" * len(buf)
            stats.append(lw.close())
        w.commit(state if state is not None else {"pid": 1}, meta or {"note": "test"})
    return stats


def _reader(runs, lose=()):
    """add_read's callback over (vaddr, bytes) runs; the pages of runs in `lose`
    ((vaddr, npages)) vanish (the writer may hand them over in pieces)."""
    gone = {a + i * PAGE for a, n in lose for i in range(n)}
    pages = {}
    for vaddr, data in runs:
        for i in range(len(data) // PAGE):
            pages[vaddr + i * PAGE] = data[i * PAGE : (i + 1) * PAGE]

    def read(batch, view):
        good, off = [], 0
        for a, n in batch:
            if a in gone:
                continue
            for i in range(n):
                view[off : off + PAGE] = pages[a + i * PAGE]
                off += PAGE
            good.append((a, n))
        return good

    return read


def read_pages(path, present, threads=2) -> tuple[dict[int, bytes], set[int]]:
    """Restore-side view: page number → data, and the set of pages planned as zero."""
    with ImageReader(path) as r:
        plan = r.plan(present)
        data = {}
        for vaddr, mv in r.iter_data(plan, threads=threads):
            assert len(mv) % PAGE == 0
            for i in range(len(mv) // PAGE):
                data[vaddr // PAGE + i] = bytes(mv[i * PAGE : (i + 1) * PAGE])
        zero = {p for v, n in plan.zero for p in range(v // PAGE, v // PAGE + n)}
    assert not (set(data) & zero)
    return data, zero


def reference(layers, present) -> dict[int, bytes | None]:
    """The obvious per-page model: newest layer's copy of each present page, None = missing."""
    pages: dict[int, bytes] = {}
    for runs in layers:  # oldest first, so newer layers overwrite
        for vaddr, data in runs:
            for i in range(len(data) // PAGE):
                pages[vaddr // PAGE + i] = bytes(data[i * PAGE : (i + 1) * PAGE])
    want = {p for v, n in present for p in range(v // PAGE, v // PAGE + n)}
    return {p: pages.get(p) for p in want}


def flip_bit(path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ (1 << bit)]))


def truncate(path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def rewrite_blob(path, kind, mutate=None, **header_kw) -> tuple[int, int]:
    """Decode a sealed msgpack file, change it, and re-seal it with valid checksums."""
    raw = path.read_bytes()
    h = hdr.parse_header(raw, str(path), kind)
    obj = blobmod.decode(raw[h.header_len :], str(path))
    if mutate is not None:
        obj = mutate(obj) or obj
    payload = blobmod.encode(obj)
    crc = zlib.crc32(payload)
    with open(path, "wb") as f:
        f.write(hdr.pack_header(kind, h.ident, h.layer, len(payload), crc, **header_kw) + payload)
    return len(payload), crc


def forge_index(img, layer: int, mutate) -> None:
    """Change a layer index AND the state manifest, so only semantic checks can catch it."""
    n, crc = rewrite_blob(img / index_name(layer), hdr.KIND_INDEX, mutate)

    def fix(env):
        env["layers"][layer]["index_len"] = n
        env["layers"][layer]["index_crc"] = crc

    rewrite_blob(img / STATE_NAME, hdr.KIND_STATE, fix)


_rng = random.Random(7)
# A 3-layer image with overlapping runs, zero pages and several chunks per layer.
IMG_LAYERS = [
    [(BASE, _rng.randbytes(6 * PAGE) + bytes(2 * PAGE) + _rng.randbytes(4 * PAGE))],
    [(BASE + 2 * PAGE, page("L1a") * 3), (BASE + 20 * PAGE, page("L1b"))],
    [(BASE + 3 * PAGE, bytes(PAGE)), (BASE + 9 * PAGE, _rng.randbytes(3 * PAGE))],
]


@pytest.fixture
def img(tmp_path):
    path = tmp_path / "img"
    write_image(path, IMG_LAYERS, chunk_bytes=2 * PAGE)
    return path


def open_and_read_all(path) -> None:
    """Everything a restore does: open, plan all stored pages, read every chunk."""
    with ImageReader(path) as r:
        r.verify(deep=True)
        present = []
        for lr in r.layers:
            present += [(v, n) for v, n, _c, _o in lr.index.runs]
            present += list(lr.index.zero)
        for _ in r.iter_data(r.plan(present)):
            pass


# ------------------------------------------------------------- round trip ----


def test_round_trip_newest_layer_wins(img):
    present = [(BASE, 12), (BASE + 20 * PAGE, 1)]
    data, zero = read_pages(img, present)
    ref = reference(IMG_LAYERS, present)
    for p, content in ref.items():
        assert content is not None
        if content == bytes(PAGE):
            assert p in zero
        else:
            assert data[p] == content, hex(p * PAGE)
    # spot checks of the rule itself
    assert data[BASE // PAGE + 2] == page("L1a")  # layer 1 beats layer 0
    assert BASE // PAGE + 3 in zero  # layer 2's zero page beats layer 1's data
    assert data[BASE // PAGE + 9] == IMG_LAYERS[2][1][1][:PAGE]  # layer 2 beats layer 0
    with ImageReader(img) as r:
        assert r.state == {"pid": 1} and r.meta == {"note": "test"}
        assert r.version == (FORMAT_MAJOR, FORMAT_MINOR)
        assert [lr.number for lr in r.layers] == [0, 1, 2]
        s = r.summary()
        assert len(s["layers"]) == 3 and s["total"]["chunks"] == sum(
            x["chunks"] for x in s["layers"]
        )
        assert r.verify(deep=True)["chunks_checked"] == s["total"]["chunks"]


def test_present_map_decides(img):
    """Pages stored in layers but absent from the final map are not restored at all."""
    data, zero = read_pages(img, [(BASE + 4 * PAGE, 1)])
    assert set(data) == {BASE // PAGE + 4} and not zero
    data, zero = read_pages(img, [])
    assert not data and not zero


def test_present_map_shapes(img):
    flat = [(BASE, 4), (BASE + 8 * PAGE, 4)]
    per_vma = {BASE: [[BASE, 4]], BASE + 8 * PAGE: [[BASE + 8 * PAGE, 2], [BASE + 10 * PAGE, 2]]}
    by_addr = {BASE: 4, BASE + 8 * PAGE: 4}
    results = [read_pages(img, shape) for shape in (flat, per_vma, by_addr)]
    assert results[0] == results[1] == results[2]


def test_missing_present_pages_raise(img):
    with ImageReader(img) as r:
        with pytest.raises(ImageCorrupt, match="stored in no layer"):
            r.plan([(BASE + 100 * PAGE, 3)])
        plan = r.plan([(BASE + 11 * PAGE, 3)], allow_missing=True)
        assert plan.missing == [(BASE + 12 * PAGE, 2)]


def test_zero_pages_not_stored(tmp_path):
    data = bytes(63 * PAGE) + os.urandom(PAGE)  # 63 zero pages, 1 random page
    (st_,) = write_image(tmp_path / "z", [[(BASE, data)]])
    assert st_.pages_in == 64 and st_.zero_pages == 63 and st_.data_pages == 1
    assert st_.bytes_raw == PAGE
    assert PAGE <= st_.bytes_stored < 2 * PAGE  # random page stored, zeros not at all
    pages_file = (tmp_path / "z" / pages_name(0)).stat().st_size
    assert pages_file < 2 * PAGE
    got, zero = read_pages(tmp_path / "z", [(BASE, 64)])
    assert set(got) == {BASE // PAGE + 63} and len(zero) == 63


def test_all_zero_runs_reported_as_zero(tmp_path):
    """A page written as data, later captured as all-zero, must plan as zero (not stale data)."""
    layers = [[(BASE, page("old") * 4)], [(BASE + PAGE, bytes(2 * PAGE))]]
    write_image(tmp_path / "i", layers)
    data, zero = read_pages(tmp_path / "i", [(BASE, 4)])
    assert zero == {BASE // PAGE + 1, BASE // PAGE + 2}
    assert set(data) == {BASE // PAGE, BASE // PAGE + 3}
    with ImageReader(tmp_path / "i") as r:
        assert r.plan([(BASE, 4)]).zero == [(BASE + PAGE, 2)]


def test_add_zero_and_buffer_reuse(tmp_path):
    """bytearray buffers are copied (caller may reuse them); add_zero records zero runs."""
    buf = bytearray(page("first") * 3)
    with ImageWriter(tmp_path / "i", chunk_bytes=8 * PAGE) as w:
        lw = w.begin_layer()
        lw.add_run(BASE, buf)
        buf[:] = page("clobbered") * 3
        lw.add_run(BASE + 3 * PAGE, memoryview(buf)[:PAGE])
        buf[:] = b"\xff" * len(buf)
        lw.add_zero(BASE + 10 * PAGE, 5)
        stats = lw.close()
        w.commit({}, {})
    assert stats.pages_in == 9 and stats.zero_pages == 5
    data, zero = read_pages(tmp_path / "i", [(BASE, 4), (BASE + 10 * PAGE, 5)])
    assert [data[BASE // PAGE + i] for i in range(4)] == [page("first")] * 3 + [page("clobbered")]
    assert len(zero) == 5


@pytest.mark.parametrize("mode", ["bytes", "bytearray"])
def test_add_runs_back_to_back_buffer(tmp_path, mode):
    """add_runs: runs in any address order, zero stretches spanning run boundaries."""
    layers = [
        [
            (BASE + 50 * PAGE, page("a") + bytes(PAGE)),
            (BASE, bytes(3 * PAGE)),
            (BASE + 10 * PAGE, bytes(PAGE) + page("b") * 2),
            (BASE + 30 * PAGE, page("c")),
        ]
    ]
    (stats,) = write_image(tmp_path / "i", layers, mode=mode, chunk_bytes=2 * PAGE)
    assert (stats.pages_in, stats.zero_pages, stats.data_pages) == (9, 5, 4)
    present = [(BASE, 3), (BASE + 10 * PAGE, 3), (BASE + 30 * PAGE, 1), (BASE + 50 * PAGE, 2)]
    data, zero = read_pages(tmp_path / "i", present)
    assert zero == {BASE // PAGE + p for p in (0, 1, 2, 10, 51)}
    assert data == {
        BASE // PAGE + 11: page("b"),
        BASE // PAGE + 12: page("b"),
        BASE // PAGE + 30: page("c"),
        BASE // PAGE + 50: page("a"),
    }
    with ImageWriter(tmp_path / "j") as w, pytest.raises(ValueError, match="buffer has"):
        w.begin_layer().add_runs([(BASE, 2)], bytes(PAGE))


def test_add_read_drops_zero_pages_and_vanished_runs(tmp_path):
    """add_read: zero pages become zero runs (the data behind them moves down in the
    writer's buffer), a run the reader could not read is not in the layer, and the
    chunks are filled across read batches; mixing with add_run seals the buffer."""
    runs = [
        (BASE, bytes(PAGE) + page("a") + bytes(2 * PAGE) + page("b")),
        (BASE + 10 * PAGE, page("gone") * 2),
        (BASE + 20 * PAGE, page("c") * 3),
    ]
    with ImageWriter(tmp_path / "i", chunk_bytes=3 * PAGE) as w:
        lw = w.begin_layer()
        got = lw.add_read(
            [(v, len(d) // PAGE) for v, d in runs], _reader(runs, [(BASE + 10 * PAGE, 2)])
        )
        lw.add_run(BASE + 30 * PAGE, page("d"))
        stats = lw.close()
        w.commit({}, {})
    assert got == 8 and (stats.pages_in, stats.zero_pages, stats.data_pages) == (9, 3, 6)
    data, zero = read_pages(
        tmp_path / "i", [(BASE, 5), (BASE + 20 * PAGE, 3), (BASE + 30 * PAGE, 1)]
    )
    assert zero == {BASE // PAGE + p for p in (0, 2, 3)}
    assert data == {
        BASE // PAGE + 1: page("a"),
        BASE // PAGE + 4: page("b"),
        **{BASE // PAGE + 20 + i: page("c") for i in range(3)},
        BASE // PAGE + 30: page("d"),
    }
    with ImageReader(tmp_path / "i") as r, pytest.raises(ImageCorrupt, match="no layer"):
        r.plan([(BASE + 10 * PAGE, 1)])


def test_level_0_stores_raw_zstd_frames(tmp_path):
    """Level 0: chunks are zstd frames of raw blocks (any zstd decoder reads them, so the
    format is unchanged), the index records the level, and the image reads back."""
    import zstandard

    from ckpt.image.layer_reader import LayerReader

    blob = os.urandom(PAGE) + page("t") * 40  # compressible, stored as is anyway
    (stats,) = write_image(tmp_path / "i", [[(BASE, blob)]], level=0, chunk_bytes=64 * PAGE)
    assert stats.bytes_stored > len(blob)  # header and block headers, nothing saved
    data, _ = read_pages(tmp_path / "i", [(BASE, 41)])
    assert b"".join(data[BASE // PAGE + i] for i in range(41)) == blob
    with ImageReader(tmp_path / "i") as r:
        lr: LayerReader = r.layers[0]
        off, clen, _, _ = lr.index.chunks[0]
        assert lr.index.stats["level"] == 0
        with open(lr.pages_path, "rb") as f:
            f.seek(lr._data_offset + off)
            frame = f.read(clen)
    assert zstandard.ZstdDecompressor().decompress(frame) == blob


def test_big_layers_go_o_direct_aligned(tmp_path):
    """Past its first 8 MiB a durable layer's chunks start 4 KiB-aligned in the file
    (O_DIRECT), zero-padded; the image reads the same, cached or not."""
    from ckpt.image.layer_writer import DIRECT_AFTER

    blob = os.urandom(16 << 20)
    runs = [(BASE, blob)]
    for mode in ("run", "read"):
        path = tmp_path / mode
        write_image(path, [runs], mode=mode)
        with ImageReader(path) as r:
            lr = r.layers[0]
            offs = sorted(off for off, *_ in lr.index.chunks)
            late = [o for o in offs if o >= DIRECT_AFTER]
            assert late and all((lr._data_offset + o) % 4096 == 0 for o in late), offs
            plan = r.plan([(BASE, len(blob) // PAGE)])
            got = bytearray(len(blob))
            for vaddr, mv in r.iter_data(plan):
                got[vaddr - BASE : vaddr - BASE + len(mv)] = mv
        assert got == blob


def test_writer_rejects_overlap_in_one_layer(tmp_path):
    with ImageWriter(tmp_path / "i") as w:
        lw = w.begin_layer()
        lw.add_run(BASE, page("a") * 2)
        lw.add_run(BASE + PAGE, page("b"))
        with pytest.raises(ValueError, match="added twice"):
            lw.close()
    assert not (tmp_path / "i").exists()
    assert os.listdir(tmp_path) == []


def test_base_image_layers_are_inherited(tmp_path):
    write_image(tmp_path / "a", [[(BASE, page("a0") * 2)]])
    with ImageWriter(tmp_path / "b", base=tmp_path / "a") as w:
        assert w.layers == 1
        lw = w.begin_layer()
        assert lw.layer == 1
        lw.add_run(BASE + PAGE, page("b1"))
        lw.close()
        w.commit({"snap": 2}, {})
    data, _ = read_pages(tmp_path / "b", [(BASE, 2)])
    assert data == {BASE // PAGE: page("a0"), BASE // PAGE + 1: page("b1")}
    data, _ = read_pages(tmp_path / "a", [(BASE, 2)])  # the base is untouched
    assert data[BASE // PAGE + 1] == page("a0")


# ------------------------------------------------------------- atomicity -----


def test_exception_aborts_and_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), ImageWriter(tmp_path / "i") as w:
        w.begin_layer().add_run(BASE, page("x"))
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_killed_mid_write_leaves_only_tmp_dir(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal
        from ckpt.image import ImageWriter
        w = ImageWriter({str(tmp_path / "img")!r})
        lw = w.begin_layer()
        lw.add_run({BASE}, os.urandom(64 * 4096))
        lw.close()
        os.kill(os.getpid(), signal.SIGKILL)   # dies before commit
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = os.listdir(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith("img.tmp-")
    with pytest.raises(ImageNotFound, match="no such image"):
        ImageReader(tmp_path / "img")
    with pytest.raises(ImageNotFound, match="incomplete image"):
        ImageReader(tmp_path / leftovers[0])


def test_destination_exists(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "file").write_text("x")
    for name in ("full", "file"):
        with pytest.raises(ImageExists, match="already exists"):
            ImageWriter(tmp_path / name)
    write_image(tmp_path / "done", [[(BASE, page("a"))]])
    with pytest.raises(ImageExists):
        ImageWriter(tmp_path / "done")
    (tmp_path / "empty").mkdir()  # an empty directory is fine: rename replaces it
    write_image(tmp_path / "empty", [[(BASE, page("a"))]])
    assert read_pages(tmp_path / "empty", [(BASE, 1)])[0]
    with pytest.raises(ImageNotFound):
        ImageWriter(tmp_path / "no" / "such" / "parent")


def test_destination_appears_during_write(tmp_path):
    w = ImageWriter(tmp_path / "i")
    w.begin_layer().close()
    (tmp_path / "i").mkdir()
    (tmp_path / "i" / "other").write_text("x")
    with pytest.raises(ImageExists):
        w.commit({}, {})
    assert sorted(os.listdir(tmp_path)) == ["i"]


def test_reader_not_found(tmp_path):
    with pytest.raises(ImageNotFound):
        ImageReader(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ImageNotFound, match="not an image directory"):
        ImageReader(tmp_path / "f")


@pytest.mark.parametrize("name", [STATE_NAME, index_name(0), pages_name(2)])
def test_directory_instead_of_file(img, name):
    os.unlink(img / name)
    (img / name).mkdir()
    with pytest.raises(ImageCorrupt, match=name):
        ImageReader(img)


def test_missing_layer_file(img):
    os.unlink(img / index_name(1))
    with pytest.raises(ImageNotFound, match=index_name(1)):
        ImageReader(img)


# ---------------------------------------------------------------- damage -----


@pytest.mark.parametrize("name", [STATE_NAME, index_name(0), pages_name(1)])
def test_empty_file(img, name):
    truncate(img / name, 0)
    with pytest.raises(ImageCorrupt, match=f"{name}: empty file"):
        ImageReader(img)


def test_truncated_pages_file(img):
    size = (img / pages_name(1)).stat().st_size
    truncate(img / pages_name(1), size - 1)
    with pytest.raises(ImageCorrupt, match=rf"{pages_name(1)}: truncated"):
        ImageReader(img)


@pytest.mark.parametrize("cut", [10, hdr.HEADER_LEN - 1, hdr.HEADER_LEN + 3, -1])
def test_truncated_index(img, cut):
    path = img / index_name(2)
    truncate(path, cut if cut >= 0 else path.stat().st_size + cut)
    with pytest.raises(ImageCorrupt, match=rf"{index_name(2)}: truncated"):
        ImageReader(img)


def test_trailing_garbage(img):
    with open(img / pages_name(0), "ab") as f:
        f.write(b"x")
    with pytest.raises(ImageCorrupt, match="trailing"):
        ImageReader(img)


def test_bit_flip_in_chunk_names_layer_and_chunk(img):
    with ImageReader(img) as r:
        lr = r.layers[0]
        off, clen, _ulen, _crc = lr.index.chunks[2]
        start = lr._data_offset + off
    flip_bit(img / pages_name(0), start + clen // 2, 3)
    with ImageReader(img) as r:  # opening does not read chunk data
        assert r.verify()["ok"]
        with pytest.raises(ImageCorrupt, match=rf"{pages_name(0)}: layer 0 chunk 2: checksum"):
            r.verify(deep=True)
        with pytest.raises(ImageCorrupt, match="layer 0 chunk 2"):
            for _ in r.iter_data(r.plan([(BASE, 12)])):
                pass
        # chunks that are not damaged still read fine
        _ = list(r.iter_data(r.plan([(BASE, 2)])))


@pytest.mark.parametrize("where", ["header", "payload", "crc"])
def test_bit_flip_in_state_file(img, where):
    size = (img / STATE_NAME).stat().st_size
    offset = {"header": 20, "crc": hdr.HEADER_LEN - 2, "payload": (hdr.HEADER_LEN + size) // 2}
    flip_bit(img / STATE_NAME, offset[where], 5)
    with pytest.raises(ImageCorrupt, match=rf"{STATE_NAME}: .*checksum mismatch"):
        ImageReader(img)


def test_every_single_bit_flip_is_detected(tmp_path):
    """Every byte of every file is covered by some checksum or check."""
    path = tmp_path / "i"
    write_image(path, [[(BASE, page("a") + bytes(PAGE))], [(BASE, page("b"))]], chunk_bytes=PAGE)
    pristine = {name: (path / name).read_bytes() for name in os.listdir(path)}
    for name, raw in pristine.items():
        step = 1 if len(raw) < 2000 else 7
        for offset in range(0, len(raw), step):
            flip_bit(path / name, offset, offset % 8)
            with pytest.raises((ImageCorrupt, ImageVersionError)):
                open_and_read_all(path)
            (path / name).write_bytes(raw)
    open_and_read_all(path)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=st.sampled_from([0, 1, 2]), data=st.binary(max_size=300), at=st.integers(0, 400))
def test_garbage_never_escapes_as_bare_exception(tmp_path_factory, name, data, at):
    path = tmp_path_factory.mktemp("g") / "i"
    write_image(path, [[(BASE, page("a"))]])
    target = path / [STATE_NAME, index_name(0), pages_name(0)][name]
    raw = target.read_bytes()
    target.write_bytes(raw[:at] + data + raw[at + len(data) :])
    with contextlib.suppress(CkptError):
        open_and_read_all(path)


# ------------------------------------------------------- forged but sealed ---


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda ix: ix["chunks"][0].__setitem__(0, 1 << 40), "bad offset"),
        (lambda ix: ix["chunks"][1].__setitem__(0, ix["chunks"][0][0] + 1), "overlaps"),
        (lambda ix: ix["chunks"][0].__setitem__(2, 128 << 20), "bad size"),
        (lambda ix: ix["chunks"][0].__setitem__(2, 4097), "bad size"),
        (lambda ix: ix["runs"].append([BASE, 1, 0, 0]), "overlap"),
        (lambda ix: ix["runs"].append([BASE + 99 * PAGE, 1, 77, 0]), "outside"),
        (lambda ix: ix["runs"].append([BASE + 99 * PAGE, 9, 0, 0]), "outside"),
        (lambda ix: ix["runs"].append([BASE + 1, 1, 0, 0]), "bad run"),
        (lambda ix: ix["zero"].append(["x", 1]), "bad 'zero' entry"),
        (lambda ix: ix.__setitem__("runs", {}), "no list 'runs'"),
        (lambda ix: ix.__setitem__("layer", 5), "expected 0"),
        (lambda ix: ix.__setitem__("page_size", 65536), "page size"),
        (lambda ix: [1, 2, 3], "not a map"),
    ],
)
def test_forged_index_is_rejected(tmp_path, mutate, message):
    path = tmp_path / "i"
    write_image(path, [[(BASE, os.urandom(3 * PAGE))]], chunk_bytes=2 * PAGE)
    forge_index(path, 0, mutate)
    with pytest.raises(ImageCorrupt, match=message):
        ImageReader(path)


def test_index_swapped_from_other_image_is_rejected(tmp_path):
    write_image(tmp_path / "a", [[(BASE, page("a"))]])
    write_image(tmp_path / "b", [[(BASE, page("b"))]])
    os.replace(tmp_path / "b" / index_name(0), tmp_path / "a" / index_name(0))
    with pytest.raises(ImageCorrupt, match=r"layer id mismatch|manifest"):
        ImageReader(tmp_path / "a")


def test_size_caps_checked_before_reading(img):
    """A header claiming a 300 MiB index is refused without reading (or allocating) it."""
    path = img / index_name(0)
    raw = path.read_bytes()
    h = hdr.parse_header(raw, str(path), hdr.KIND_INDEX)
    path.write_bytes(hdr.pack_header(hdr.KIND_INDEX, h.ident, h.layer, 300 << 20, 0) + raw[64:])
    with pytest.raises(ImageCorrupt, match="exceeds"):
        ImageReader(img)


def test_forged_frame_size_is_rejected(tmp_path):
    """A chunk whose zstd frame declares another size than the index is refused."""
    path = tmp_path / "i"
    write_image(path, [[(BASE, page("a") * 2)]])
    with ImageReader(path) as r:
        ulen = r.layers[0].index.chunks[0][2]

    def lie(ix):
        ix["chunks"][0][2] = ulen + PAGE
        ix["runs"][0][1] = 3

    forge_index(path, 0, lie)
    with ImageReader(path) as r, pytest.raises(ImageCorrupt, match="layer 0 chunk 0: frame holds"):
        r.verify(deep=True)


# --------------------------------------------------------------- versions ----


def test_unknown_major_version_refused(img):
    unknown = max(hdr.READ_MAJORS) + 1
    rewrite_blob(img / STATE_NAME, hdr.KIND_STATE, major=unknown)
    with pytest.raises(ImageVersionError, match=f"format {unknown}.{FORMAT_MINOR} .*newer ckpt"):
        ImageReader(img)


def test_unknown_major_in_layer_index_refused(img):
    rewrite_blob(img / index_name(1), hdr.KIND_INDEX, major=FORMAT_MAJOR + 7)
    with pytest.raises(ImageVersionError, match=index_name(1)):
        ImageReader(img)


def test_major_version_checked_before_the_rest_of_the_header(img):
    """A newer major may change everything after byte 12: only the prefix is trusted."""
    path = img / STATE_NAME
    raw = bytearray(path.read_bytes())
    raw[8:10] = (max(hdr.READ_MAJORS) + 1).to_bytes(2, "little")
    raw[12:] = os.urandom(len(raw) - 12)
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageVersionError):
        ImageReader(img)


def test_newer_minor_version_is_read(img):
    """Newer minors may grow headers and add msgpack keys; this reader ignores both."""
    extra = b"future-fields-16"
    for name in os.listdir(img):
        path = img / name
        raw = path.read_bytes()
        kind = raw[4:8]
        if kind == hdr.KIND_PAGES:
            h = hdr.parse_header(raw, str(path), kind)
            new = hdr.pack_header(
                kind, h.ident, h.layer, h.payload_len, 0, minor=FORMAT_MINOR + 3, extra=extra
            )
            path.write_bytes(new + raw[h.header_len :])
    for layer in range(3):

        def add_keys(ix):
            ix["new_in_1_3"] = {"whatever": [1, 2]}

        n, crc = rewrite_blob(
            img / index_name(layer), hdr.KIND_INDEX, add_keys, minor=FORMAT_MINOR + 3, extra=extra
        )

        def fix(env, layer=layer, n=n, crc=crc):
            env["layers"][layer].update(index_len=n, index_crc=crc, future=True)
            env["also_new"] = 1

        rewrite_blob(img / STATE_NAME, hdr.KIND_STATE, fix, minor=FORMAT_MINOR + 3, extra=extra)
    with ImageReader(img) as r:
        assert r.version == (FORMAT_MAJOR, FORMAT_MINOR + 3)
        assert r.layers[0]._data_offset == hdr.HEADER_LEN + len(extra)
    present = [(BASE, 12), (BASE + 20 * PAGE, 1)]
    data, zero = read_pages(img, present)
    ref = reference(IMG_LAYERS, present)
    assert all((p in zero) if c == bytes(PAGE) else data[p] == c for p, c in ref.items())


def test_bad_magic(img):
    path = img / STATE_NAME
    raw = path.read_bytes()
    path.write_bytes(b"XKPT" + raw[4:])
    with pytest.raises(ImageCorrupt, match="not a ckpt image file"):
        ImageReader(img)


def test_known_magic_unknown_kind_is_a_version_error(img):
    """CKPT magic with a file kind we don't know: a newer ckpt wrote it."""
    path = img / STATE_NAME
    raw = path.read_bytes()
    path.write_bytes(raw[:4] + b"STA2" + raw[8:])
    with pytest.raises(ImageVersionError, match="unknown ckpt file kind"):
        ImageReader(img)


def test_wrong_kind_of_file(img):
    os.replace(img / index_name(0), img / STATE_NAME)
    with pytest.raises(ImageCorrupt, match="is a layer index file, expected a state file"):
        ImageReader(img)


# A format 1.0 image, kept verbatim: every future reader must still read it.
# Layer 0: pages BASE..+2 ("v1-a", zero, "v1-b"); layer 1: BASE+1 "v1-c"; state {"pid": 42}.
GOLDEN_V1_0 = {
    "layer-0000.index.bin": (
        "eNpz9g4I8fRziWBkYGBwAGKri60HNAye8H0rUNoeu32ePAMUbIfSZuyyL2BidRs2OLUvzUmsTC1iWFmQ"
        "mJ4aX5xZlXpWAMIpjs9JzVNclpxRmpddPHEKg+JZBYZzhWV2vEuKSvOKJ005z8BQDzYGaDWMowDkMC6p"
        "Si3KnzgJKiTAwLi0uCSxpBhm0wqI4Zl5zKtACuPBXMZVKYkliRA208qkyhKgiqLEcqCVayCc4pL8otQU"
        "mHMYAdFuULI="
    ),
    "layer-0000.pages.bin": (
        "eNpz9g4ICXB0d2VkYGBwAGKri60HNAye8H0rUNoeu32ePAMUKDJggoNuzG0aW/X/JjDI72VgSCgz1E2s"
        "UQaSSTXKTAzf2et22v9ZxAoAG7cXUw=="
    ),
    "layer-0001.index.bin": (
        "eNpz9g4I8fRziWBkYGBwAOLooEnm9Q2r1no+XVtzuWRlPkgcBOZDafuZB19DmQyFroVh7UtzEitTixhX"
        "FiSmp8YXZ1alnhVgAHOK43NS88SXJWeU5mUXT5zCIA6UOGf9/277kqLSPKDAeQaGeqAhAgxAK5ZUpRbl"
        "T1haXJJYUgwzcQXEkMw8xlUg2Xgwl2FVSmJJIoTNuDKpsgSooiixHGj0GginuCS/KDUFZi0jAPhlT1c="
    ),
    "layer-0001.pages.bin": (
        "eNpz9g4ICXB0d2VkYGBwAOLooEnm9Q2r1no+XVtzuWRlPkgcBMQZMIHvgymMGlv1/yYw8OcyMBiUGeom"
        "1ygzMnxvj98CAHHeFGo="
    ),
    "state.bin": (
        "eNpz9g4ICQ5xDGFkYGBwAGIGQSVjl9C08o6Zq3afufvuPwiAhM8zQIDW0oAmKJOhdeOq7taVBYnpqfHF"
        "mVWpZwUYlpUXZZakFq1Kzi4oUTDQM9QzWJaTWJlaVDypdSmYwbAoM+WIgNXF1gMaBk/4vhUobY/dPk9+"
        "ZWZeSmpFfE5q3pntUHZyUfK5F7LsZmDji0FSilAjGMFGRAdNMq9vWLXW8+namsslK/ORjJiPZMTrgzPt"
        "EUaIL8lNLUlsXJ5clJpYkpqyLD0/JyU1b2lxCZDXuLggM0ULAE0QcFU="
    ),
}


def test_golden_v1_0_image_still_reads(tmp_path):
    path = tmp_path / "golden"
    path.mkdir()
    for name, b64 in GOLDEN_V1_0.items():
        (path / name).write_bytes(zlib.decompress(base64.b64decode(b64)))
    with ImageReader(path) as r:
        assert r.version == (1, 0) and r.state == {"pid": 42}
        assert r.image_id.hex() == "00112233445566778899aabbccddeeff"
    data, zero = read_pages(path, [(BASE, 3)])
    assert data == {
        BASE // PAGE: page("v1-a"),
        BASE // PAGE + 1: page("v1-c"),
        BASE // PAGE + 2: page("v1-b"),
    }
    assert not zero


# ------------------------------------------------------ properties vs model --

layer_runs = st.lists(
    st.tuples(
        st.integers(0, 40),  # first page
        st.lists(st.sampled_from(["z", "d"]), min_size=1, max_size=7),  # pages: zero or data
    ),
    max_size=6,
)
present_runs = st.lists(st.tuples(st.integers(0, 48), st.integers(0, 9)), max_size=6)


def build_layers(spec) -> list[list[tuple[int, bytes]]]:
    """Hypothesis spec → layers of disjoint (vaddr, bytes) runs with distinct page contents."""
    layers = []
    for li, runs in enumerate(spec):
        taken: set[int] = set()
        out = []
        for first, kinds in runs:
            pages = set(range(first, first + len(kinds)))
            if pages & taken:
                continue
            taken |= pages
            data = b"".join(
                bytes(PAGE) if k == "z" else page(f"L{li}P{first + i}") for i, k in enumerate(kinds)
            )
            out.append((BASE + first * PAGE, data))
        layers.append(out)
    return layers


@FAST
@given(
    spec=st.lists(layer_runs, min_size=1, max_size=4),
    present=present_runs,
    mode=st.sampled_from(["run", "bytes", "bytearray", "read"]),
    level=st.sampled_from([1, 0]),
)
def test_image_matches_per_page_reference(tmp_path_factory, spec, present, mode, level):
    layers = build_layers(spec)
    present = [(BASE + p * PAGE, n) for p, n in present]
    ref = reference(layers, present)
    path = tmp_path_factory.mktemp("p") / "img"
    write_image(path, layers, chunk_bytes=3 * PAGE, mode=mode, level=level)
    if any(v is None for v in ref.values()):
        with ImageReader(path) as r, pytest.raises(ImageCorrupt):
            r.plan(present)
        return
    data, zero = read_pages(path, present, threads=1 + len(spec) % 2)
    assert set(data) | zero == set(ref)
    for p, content in ref.items():
        if content == bytes(PAGE):
            assert p in zero
        else:
            assert data[p] == content


@settings(max_examples=300, deadline=None)
@given(
    layers=st.lists(
        st.lists(st.tuples(st.integers(0, 200), st.integers(1, 30), st.booleans()), max_size=8),
        max_size=5,
    ),
    present=st.lists(st.tuples(st.integers(0, 240), st.integers(0, 40)), max_size=8),
)
def test_resolve_matches_per_page_reference(layers, present):
    """The interval resolver alone, on bigger random inputs (no I/O)."""
    owner: dict[int, tuple[int, int, int] | None] = {}  # page → (layer, chunk, offset) / None=zero
    recs_per_layer = []
    for li, runs in enumerate(layers):
        taken: set[int] = set()
        recs = []
        for ci, (first, n, is_zero) in enumerate(runs):
            if taken & set(range(first, first + n)):
                continue
            taken |= set(range(first, first + n))
            recs.append((first, first + n, -1 if is_zero else ci, 0 if is_zero else 5))
            for i in range(n):
                owner[first + i] = None if is_zero else (li, ci, 5 + i)
        recs_per_layer.append(LayerRecords.build(sorted(recs)))
    wanted = normalize([(p * PAGE, n) for p, n in present])
    res = resolve(wanted, recs_per_layer)
    got: dict[int, tuple[int, int, int] | None] = {}
    missing = set()
    for (li, ci), pieces in res.data.items():
        for first, n, off in pieces:
            for i in range(n):
                assert first + i not in got
                got[first + i] = (li, ci, off + i)
    for s, e in res.zero:
        for p in range(s, e):
            assert p not in got
            got[p] = None
    for s, e in res.missing:
        missing.update(range(s, e))
    want_pages = {p for s, e in wanted for p in range(s, e)}
    assert missing == {p for p in want_pages if p not in owner}
    assert got == {p: owner[p] for p in want_pages if p in owner}


def test_state_major_2_when_a_1x_reader_would_restore_wrongly(tmp_path):
    """A tree, several threads, memfd mappings, new fd kinds or a network lock make
    the state file 2.0 (1.x readers refuse it); anything else stays 1.x."""
    from ckpt.model import state_version

    plain = {"threads": [{}], "vmas": [{"kind": "anon"}], "fds": [{"kind": "file"}]}
    assert state_version(plain) == (FORMAT_MAJOR, FORMAT_MINOR)
    for change in (
        {"tree": [dict(plain)]},
        {"threads": [{}, {}]},
        {"vmas": [{"kind": "memfd"}]},
        {"vmas": [{"kind": "shmem", "shared_with": [0, 4096]}]},
        {"fds": [{"kind": "pipe"}]},
        {"net_lock": "ckpt_lock_1_ab"},
    ):
        assert state_version({**plain, **change}) == (2, 0), change
    w = ImageWriter(str(tmp_path / "img"))
    w.commit({**plain, "tree": [dict(plain)]}, {})
    with ImageReader(str(tmp_path / "img")) as r:
        assert r.version == (2, 0)
        assert r.state["tree"] == [plain]
