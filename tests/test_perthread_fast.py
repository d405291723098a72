"""The per-thread fast paths of issue 12 give what the plain code gives.

- procfs.read_task_files: many threads' files in one call (a thread gone: None);
- procfs.ThreadStatus / status_values: a frozen thread's status reduced to the lines
  ckpt reads, equal to parse_status's, other line ends included; another line is an
  error, never a silent default;
- schema._compile: the builder compiled per dataclass against _build_generic, on a
  thread record and mutations of it (same object, or the same error);
- model.to_plain: the compiled dict displays against a plain walk of the fields.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest

from ckpt import model as m
from ckpt import schema
from ckpt.kernel import procfs

STATUS = (
    b"Name:\tworker\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t7\nPid:\t8\n"
    b"Uid:\t0\t0\t0\t0\nGid:\t5\t5\t5\t5\nGroups:\t1 2 \nNoNewPrivs:\t0\nSeccomp:\t0\n"
    b"Seccomp_filters:\t0\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n"
    b"CapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n"
    b"untag_mask:\t0xffffffffffffffff\n"
)


def test_read_task_files_fake_tree(tmp_path, monkeypatch):
    for tid, text in ((7, b"7 (a) S\n"), (8, b"")):
        (tmp_path / "7" / "task" / str(tid)).mkdir(parents=True)
        (tmp_path / "7" / "task" / str(tid) / "stat").write_bytes(text)
    big = b"x" * 70000  # larger than the first buffer: read again with a larger one
    (tmp_path / "7" / "task" / "7" / "children").write_bytes(big)
    monkeypatch.setattr(procfs, "PROC_ROOT", str(tmp_path))
    assert procfs.read_task_files(7, [7, 9, 8], "stat") == [b"7 (a) S\n", None, b""]
    assert procfs.read_task_files(7, [7], "children") == [big]
    assert procfs.read_task_files(7, [], "stat") == []
    with pytest.raises(procfs.NoSuchProcess):
        procfs.read_task_files(6, [6], "stat")


def test_thread_status_is_parse_status():
    full = procfs.parse_status(STATUS)
    ts = procfs.thread_status(STATUS)
    assert ts == {k: full[k] for k in procfs.THREAD_STATUS_KEYS if k in full}
    assert ts.get("x86_Thread_features", "") == ""  # a listed line the kernel lacks
    with pytest.raises(KeyError):
        ts["x86_Thread_features"]
    for key in ("Pid", "Name"):  # not read: an error, not a default
        with pytest.raises(LookupError, match="THREAD_STATUS_KEYS"):
            ts.get(key, "0")
        with pytest.raises(LookupError, match="THREAD_STATUS_KEYS"):
            ts[key]
    # other line ends (as str.splitlines cuts them), ASCII or not, and a repeated line
    for extra in (b"\r", b"\x0b", b"\x1c", "\u2028".encode(), b"\x85", b"\xff", b"Seccomp:\t2\n"):
        data = STATUS.replace(b"Seccomp:", extra + b"Seccomp:", 1)
        full = procfs.parse_status(data)
        want = {k: full[k] for k in procfs.THREAD_STATUS_KEYS if k in full}
        assert procfs.status_values(data, procfs.THREAD_STATUS_KEYS) == want, extra


def _thread_state() -> dict:
    t = m.Thread(
        tid=8, regs={n: i * 4096 for i, n in enumerate(m.REG_NAMES)}, xstate=b"\0" * 64,
        sigmask=1 << 9, pending=[b"\0" * 128], sigaltstack=[0, 2, 0], rseq=m.Rseq(4096, 32, 7),
        robust_list=[8192, 24], clear_child_tid=12288, comm=b"worker",
        attrs=m.ThreadAttrs(sched=m.SchedAttr(0, 0, 0, 0), affinity=[0, 1], spec=[1, 2, 0]),
    )  # fmt: skip
    return m.to_plain(t)


def _outcome(f, cls, data):
    try:
        return "ok", f(cls, copy.deepcopy(data))
    except schema.SchemaError as e:
        return "error", str(e)


@pytest.mark.parametrize("cls", [m.Thread, m.Creds])
def test_compiled_build_is_generic_build(cls):
    if cls is m.Thread:
        base = _thread_state()
    else:
        base = m.to_plain(m.Creds([0] * 4, [0] * 4, [1, 2], [0, 1, 1, 2, 0], seccomp=[0]))
    assert _outcome(schema.build, cls, base)[0] == "ok"
    bad = [None, -1, 1 << 64, -(1 << 63) - 1, True, "x", b"x", [], {}, 1.5, 1 << 47, 7]
    cases = []  # every field: gone, each bad value, each bad value inside it
    for k in base:
        data = copy.deepcopy(base)
        del data[k]
        cases.append(data)
        for v in bad:
            cases.append({**copy.deepcopy(base), k: v})
            inner = copy.deepcopy(base)
            if isinstance(inner[k], dict) and inner[k]:
                inner[k][next(iter(inner[k]))] = v
                cases.append(inner)
            elif isinstance(inner[k], list) and inner[k]:
                inner[k][-1] = v
                cases.append(inner)
    errors = 0
    for data in cases:
        got = _outcome(schema.build, cls, data)
        assert got == _outcome(schema._build_generic, cls, data)
        errors += got[0] == "error"
    assert errors > len(cases) // 2  # (the cases do reach the checks)


def test_compiled_to_plain_is_plain_walk():
    def walk(obj):
        if type(obj) in (int, str, bytes, bool, float, type(None)):
            return obj
        if dataclasses.is_dataclass(obj):
            return {f.name: walk(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, list | tuple):
            return [walk(v) for v in obj]
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items()}
        return obj

    t = schema.build(m.Thread, _thread_state())
    t.pending = (b"\1" * 128,)  # a tuple: a list in the plain data, as before
    got = m.to_plain(t)
    assert got == walk(t) and repr(got) == repr(walk(t))
    assert got["regs"] is not t.regs and got["attrs"]["affinity"] is not t.attrs.affinity
