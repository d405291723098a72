"""The trust model, enforced (issue 11 part 2; docs/SECURITY.md).

- An image is read only if its directory and files belong to the user reading it
  and nobody else may write them (exit 17); an image is written only below
  directories no other user can change (exit 17, the target runs on).
- Every field of a state is checked against the schema before anything happens: a
  state rewritten with valid checksums but wrong types, missing fields or values out
  of range is refused by `restore` and `show` with exit 6, never `internal error`
  (exit 1), and no process is started.
- Decoding is bounded: a state or index whose msgpack would take far more memory
  than its size (empty maps, tiny lists) is refused before it is decoded.
- Pipe bytes that do not fit the pipe are refused (they used to hang the restore).
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import subprocess
import typing
from pathlib import Path

import pytest
from helpers import CKPT, Result, assert_error, proc_alive
from test_image import forge_index, rewrite_blob

from ckpt import model
from ckpt.errors import ImageCorrupt
from ckpt.image import header as hdr
from ckpt.image.load import load
from ckpt.image.writer import STATE_NAME

NOBODY = 65534


@pytest.fixture(scope="module")
def images(module_e2e):
    """Images of a process with every fd kind and one with sockets (dumped once)."""
    out = {}
    for name, args in (("fdkinds", ("pipes,events,epoll,inotify,memfd",)), ("sockets", ("unix",))):
        w = module_e2e.spawn(name, *args)
        img = module_e2e.path(f"img-{name}")
        module_e2e.dump_ok(w, img)
        out[name] = (img, w)
    return out


def copy_image(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    os.chmod(dst, 0o700)
    return dst


def ckpt(e2e, *args, timeout: float = 120) -> Result:
    return e2e.ckpt(*args, timeout=timeout)


# ---------------------------------------------------------------- who wrote the image


def test_image_owned_by_another_user_or_writable_is_refused(e2e, images):
    src, _ = images["fdkinds"]
    cases = {
        "state group-writable": lambda d: os.chmod(d / STATE_NAME, 0o620),
        "index of nobody": lambda d: os.chown(d / "layer-0000.index.bin", NOBODY, NOBODY),
        "pages world-writable": lambda d: os.chmod(d / "layer-0000.pages.bin", 0o602),
        "directory world-writable": lambda d: os.chmod(d, 0o707),
        "directory of nobody": lambda d: os.chown(d, NOBODY, NOBODY),
        "state a symlink": lambda d: (
            os.rename(d / STATE_NAME, d / "real"),
            os.symlink("real", d / STATE_NAME),
        ),
    }
    for what, damage in cases.items():
        img = copy_image(src, e2e.path("img"))
        damage(img)
        for cmd in (["restore", "-D", str(img), "--new-pid", "--detach"], ["show", str(img)]):
            res = ckpt(e2e, *cmd)
            assert res.returncode == 17, f"{what}: {res}"
            assert_error(res, 17, str(img))


def test_dump_below_a_directory_others_can_change_is_refused(e2e):
    """Another user could move ckpt's half-written directory away and put a link in its
    place: refused (exit 17) before anything is touched; the target runs on."""
    w = e2e.spawn("signals")
    for mode, owner in ((0o777, 0), (0o755, NOBODY)):
        d = e2e.path("shared")
        d.mkdir()
        os.chmod(d, mode)
        os.chown(d, owner, owner)
        res = e2e.dump(w.pid, d / "img")
        assert_error(res, 17, str(d))
        assert not list(d.iterdir()), "nothing may be written there"
        assert proc_alive(w.pid)
    sticky = e2e.path("sticky")
    sticky.mkdir()
    os.chmod(sticky, 0o1777)  # like /tmp: others cannot rename what ckpt makes there
    e2e.dump_ok(w, sticky / "img")


# ---------------------------------------------------------------- the schema


def _fields(data, cls, path=()):
    """(path, type hint, required) of every dataclass field present in data, walking
    the state with the model's own type hints (what a mutation may break)."""
    if not isinstance(data, dict):
        return
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name not in data:
            continue
        tp, v, p = hints[f.name], data[f.name], (*path, f.name)
        yield p, tp, required
        yield from _walk(v, tp, p)


def _walk(v, tp, path):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        yield from _fields(v, tp, path)
    elif origin is list and args and isinstance(v, list):
        for i, x in enumerate(v[:3]):
            yield from _walk(x, args[0], (*path, i))
    elif origin in (typing.Union, __import__("types").UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and v is not None:
            yield from _walk(v, rest[0], path)


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def _set(obj, path, value):
    _get(obj, path[:-1])[path[-1]] = value


WRONG = {int: "12", str: 12, bytes: 12, bool: "yes", list: 12, dict: [1]}


def _mutations(state: dict, rng: random.Random, n: int):
    """(name, mutate(state), must_fail) for n mutations of a real state."""
    fields = [
        (p, tp, req)
        for p, tp, req in _fields(state, model.ProcessImage)
        if p[-1] not in ("local", "remote", "options")  # typed Any: anything goes
    ]
    out: list = []
    while len(out) < n:
        p, tp, req = rng.choice(fields)
        v = _get(state, p)
        kind = rng.choice(["type", "type", "missing", "negative", "huge", "none"])
        if kind == "type" and type(v) in WRONG:
            out.append((f"{'.'.join(map(str, p))}={WRONG[type(v)]!r}", p, WRONG[type(v)], True))
        elif kind == "missing":
            out.append((f"del {'.'.join(map(str, p))}", p, KeyError, req))
        elif kind == "none" and v is not None and type(None) not in typing.get_args(tp):
            out.append((f"{'.'.join(map(str, p))}=None", p, None, True))
        elif kind == "negative" and type(v) is int:
            out.append((f"{'.'.join(map(str, p))}=-2**63", p, -(2**63), False))
        elif kind == "huge" and type(v) is int:
            out.append((f"{'.'.join(map(str, p))}=2**64-1", p, 2**64 - 1, False))
        elif kind == "huge" and type(v) in (str, bytes) and v:
            out.append((f"{'.'.join(map(str, p))}*100000", p, v * 100000, False))
        elif kind == "huge" and type(v) is list and v:
            out.append((f"{'.'.join(map(str, p))}*1000", p, v * 1000, False))
    return out


# Values out of range that would reach the kernel, struct.pack or an index: refused.
RANGE_CASES = [
    ("fds.0.fd", -5),
    ("fds.0.fd", 1 << 31),
    ("fds.0.kind", "bogus"),
    ("vmas.0.start", 1 << 63),
    ("vmas.0.start", 4097),
    ("vmas.0.present", [[0, 1]]),
    ("vmas.0.present", [[0x10000, 1, 2]]),
    ("sigactions.0.signo", 99),
    ("threads", []),
    ("threads.0.pending", [b"\0" * 7]),
    ("threads.0.regs", {"rip": 1}),
    ("threads.0.sigaltstack", [0, 0]),
    ("uids", []),
    ("pid", 0),
    ("pid", 1 << 40),
    ("umask", 0o7777),
    ("rlimits", {99: [0, 0]}),
    ("net_lock", "t\nflush ruleset"),
    ("cwd", "relative/dir"),
    ("exe", "/bin/x\0y"),
    ("mm.start_stack", 1 << 60),
    ("shared_pending", [b"short"]),
    ("itimers", [{"which": 7, "interval_us": 0, "value_us": 0}]),
]


def _rewrite(src: Path, dst: Path, path, value) -> Path:
    img = copy_image(src, dst)

    def mutate(env):
        if value is KeyError:
            del _get(env["state"], path[:-1])[path[-1]]
        else:
            _set(env["state"], path, value)

    rewrite_blob(img / STATE_NAME, hdr.KIND_STATE, mutate)
    return img


def _path(s: str) -> tuple:
    return tuple(int(x) if x.isdigit() else x for x in s.split("."))


def _state(img: Path) -> dict:
    raw = (img / STATE_NAME).read_bytes()
    h = hdr.parse_header(raw, "state", hdr.KIND_STATE)
    from ckpt.image.blob import decode

    return decode(raw[h.header_len :], "state")["state"]


def test_rewritten_states_are_refused_up_front(e2e, images):
    """300 mutations of two real states (wrong types, nil, missing fields, extreme
    numbers, long strings and lists) plus values out of range: each loads cleanly or
    is ImageCorrupt naming the field, never another exception; every mutation that
    breaks a type, a required field or a range is refused."""
    rng = random.Random(11)
    checked = refused = 0
    for name in ("fdkinds", "sockets"):
        src, _ = images[name]
        state = _state(src)
        cases = _mutations(state, rng, 150)
        if name == "fdkinds":
            cases += [(f"{p}={v!r}", _path(p), v, True) for p, v in RANGE_CASES]
        for what, path, value, must_fail in cases:
            img = _rewrite(src, e2e.path("img"), path, value)
            try:
                load(str(img))[0].close()
            except ImageCorrupt as exc:
                refused += 1
                assert "malformed" in str(exc) or "state" in str(exc), what
            except Exception as exc:
                raise AssertionError(f"{name} {what}: {type(exc).__name__}: {exc}") from exc
            else:
                assert not must_fail, f"{name} {what}: accepted"
            checked += 1
            shutil.rmtree(img)
    assert checked > 300 and refused > 150, (checked, refused)


def test_rewritten_states_exit_6_never_1(e2e, images):
    """Through the CLI: `restore` and `show` of corrupt states exit 6 naming the field
    (no traceback, no `internal error`) and start no process."""
    src, w = images["fdkinds"]
    before = {p for p in os.listdir("/proc") if p.isdigit()}
    rng = random.Random(5)
    state = _state(src)
    cases = [m for m in _mutations(state, rng, 200) if m[3]][:10]
    cases += [(f"{p}={v!r}", _path(p), v, True) for p, v in rng.sample(RANGE_CASES, 8)]
    for what, path, value, _ in cases:
        img = _rewrite(src, e2e.path("img"), path, value)
        for cmd in (["restore", "-D", str(img), "--new-pid", "--detach"], ["show", str(img)]):
            res = ckpt(e2e, *cmd)
            assert res.returncode == 6, f"{what}: {res}"
            assert_error(res, 6, "malformed")
        shutil.rmtree(img)
    after = {p for p in os.listdir("/proc") if p.isdigit()} - before
    assert not [p for p in after if w.ident.matches(int(p))], "a corrupt image started a process"


# ---------------------------------------------------------------- decoding, bounded


_HWM = """
import atexit, runpy, sys
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write(f"\\nHWM {line.split()[1]}\\n")
atexit.register(hwm)
sys.argv = ["ckpt", *sys.argv[1:]]
runpy.run_module("ckpt", run_name="__main__")
"""


def _peak_rss_kib(cmd: list[str], cwd: Path) -> tuple[int, int, str]:
    """Exit code, peak RSS (VmHWM of ckpt's own mm: not the test's, inherited through
    fork) and stderr of a ckpt command."""
    p = subprocess.run([CKPT[0], "-c", _HWM, *cmd], cwd=cwd, capture_output=True, text=True)
    err, _, hwm = p.stderr.rpartition("\nHWM ")
    return p.returncode, int(hwm.split()[0]), err


def test_decoding_a_hostile_state_is_bounded(e2e, images):
    """8 MiB of empty maps in a state (valid checksums) would decode into ~600 MB of
    Python objects: refused (exit 6) before decoding, ckpt staying small."""
    src, _ = images["fdkinds"]
    img = copy_image(src, e2e.path("img"))
    rewrite_blob(img / STATE_NAME, hdr.KIND_STATE, lambda env: env.update(junk=[{}] * (8 << 20)))
    code, kib, err = _peak_rss_kib(["show", str(img)], e2e.base)
    assert code == 6, err
    assert "memory to decode" in err, err
    assert kib < 250 << 10, f"ckpt show took {kib >> 10} MiB to refuse it"


def test_decoding_a_hostile_index_is_bounded(e2e, images):
    src, _ = images["fdkinds"]
    img = copy_image(src, e2e.path("img"))
    forge_index(img, 0, lambda idx: idx.update(junk=[[]] * (8 << 20)))
    code, kib, err = _peak_rss_kib(["restore", "-D", str(img), "--new-pid", "--detach"], e2e.base)
    assert code == 6, err
    assert "memory to decode" in err, err
    assert kib < 250 << 10, f"ckpt restore took {kib >> 10} MiB to refuse it"


# ---------------------------------------------------------------- pipes


def test_pipe_bytes_larger_than_the_pipe_are_refused(e2e, images):
    """A pipe whose buffered bytes exceed its capacity would block the refill forever:
    refused up front (exit 6) naming the fd."""
    src, _ = images["fdkinds"]
    state = _state(src)
    i = next(i for i, f in enumerate(state["fds"]) if f["kind"] == "pipe" and f.get("data"))
    f = state["fds"][i]
    big = b"x" * ((f["pipe_size"] or 65536) + 4096)
    img = _rewrite(src, e2e.path("img"), ("fds", i, "data"), big)
    bg = e2e.ckpt_bg("restore", "-D", str(img), "--new-pid", "--detach")
    res = bg.wait(60)
    assert_error(res, 6, f"fds[{i}].data", "do not fit")


def test_pipe_refill_never_blocks(e2e):
    """Defence in depth: ckpt's refill of a pipe too small for the bytes fails at once
    instead of waiting forever (the copy shares a blocking open file description)."""
    code = (
        "import os, sys\n"
        "from ckpt.kernel import fdobjs\n"
        "r, w = os.pipe()\n"
        "try:\n"
        "    fdobjs.pipe_fill(w, b'y' * (1 << 20))\n"
        "except OSError as exc:\n"
        "    assert 'pipe is full' in str(exc), exc\n"
        "    assert os.get_blocking(w)  # the description's flags are put back\n"
        "    sys.exit(0)\n"
        "sys.exit(3)\n"
    )
    p = subprocess.run([CKPT[0], "-c", code], cwd=e2e.base, timeout=30, capture_output=True)
    assert p.returncode == 0, p.stderr.decode()
