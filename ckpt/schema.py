"""The process state's schema: every field of an image's state checked before use.

A state file's checksums only say the bytes are the ones written; they say nothing
about a state written by something else, or by a buggy ckpt. Everything restore
does comes from these values (syscall arguments, struct.pack, indexes into lists),
so `model.from_dict` builds the dataclasses through `build()` here, which checks,
before any side effect:

- types, from the dataclasses' own type hints (int, str, bytes, bool, list[...],
  dict[..., ...], X | None, nested dataclasses), so a field added to the model is
  checked without touching this file; a missing required field is an error too;
- every integer fits in 64 bits (signed or unsigned);
- ranges and lengths where the value reaches the kernel or an index (`RANGES`,
  `CHECKS`): fd numbers, PIDs, page-aligned user addresses below 2^47, page runs
  inside their mapping, signal numbers, siginfo sizes, socket names, pipe data
  that fits its pipe, references between records.

A failure is SchemaError (a ValueError, so callers that already turn ValueError into
their own error keep doing so) naming the field: `tree[0].fds[3].fd: -7 is out of
range (-1 … 1048575)`. image.load.load turns it into ImageCorrupt (exit 6).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
import types
import typing
from collections.abc import Callable
from typing import Any, get_args, get_origin, get_type_hints

from . import model as m

PAGE = 4096
TASK_SIZE = 1 << 47  # user addresses (4-level paging; model.SLOT_SHIFT relies on it)
PID_MAX = 1 << 22  # PID_MAX_LIMIT
FD_MAX = 1 << 20  # NR_OPEN: no fd number reaches it
U32, U64 = (1 << 32) - 1, (1 << 64) - 1
I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
PATH_MAX = 4096
SIGINFO = 128  # bytes of a siginfo_t
UNIX_PATH = 108  # sun_path
BPF_MAXINSNS = 4096  # the longest classic BPF program a socket takes
# what a pty queues for its master: its line discipline's 4 KiB and an 8 KiB flip buffer
# (the kernel's limits), with room to spare
PTY_OUTPUT_MAX = 64 << 10


class SchemaError(ValueError):
    """A state value of the wrong type, out of range, or missing, with its field path."""

    def __init__(self, msg: str, where: str = ""):
        super().__init__(msg)
        self.msg = msg
        self.path: list[str] = [where] if where else []  # innermost first

    def at(self, part: str) -> SchemaError:
        self.path.append(part)
        return self

    def __str__(self) -> str:
        where = "".join(reversed(self.path)).lstrip(".")
        return f"{where or 'state'}: {self.msg}"


def _tname(v: Any) -> str:
    return "nothing (nil)" if v is None else type(v).__name__


# ---------------------------------------------------------------- leaves


def _int(v: Any) -> int:
    if type(v) is int:
        if I64_MIN <= v <= U64:
            return v
        raise SchemaError(f"{v} does not fit in 64 bits")
    if type(v) is bool:
        return int(v)
    raise SchemaError(f"expected an integer, got {_tname(v)}")


def _str(v: Any) -> str:
    if type(v) is str:
        return v
    raise SchemaError(f"expected a string, got {_tname(v)}")


def _bytes(v: Any) -> bytes:
    if type(v) is bytes:
        return v
    raise SchemaError(f"expected bytes, got {_tname(v)}")


def _bool(v: Any) -> bool:
    if type(v) is bool:
        return v
    if type(v) is int and v in (0, 1):
        return bool(v)
    raise SchemaError(f"expected a boolean, got {_tname(v)}")


def _float(v: Any) -> float:
    if type(v) in (int, float):
        return v
    raise SchemaError(f"expected a number, got {_tname(v)}")


def _any(v: Any) -> Any:
    return v


_LEAVES: dict[Any, Callable[[Any], Any]] = {
    int: _int,
    str: _str,
    bytes: _bytes,
    bool: _bool,
    float: _float,
    Any: _any,
}


# ---------------------------------------------------------------- containers


def _list_of(item: Callable[[Any], Any]) -> Callable[[Any], list]:
    if item is _int:

        def conv_ints(v: Any) -> list:
            if type(v) is not list:
                raise SchemaError(f"expected a list, got {_tname(v)}")
            for i, x in enumerate(v):
                if type(x) is not int or not I64_MIN <= x <= U64:
                    try:
                        v[i] = _int(x)
                    except SchemaError as e:
                        raise e.at(f"[{i}]") from None
            return v

        return conv_ints

    def conv(v: Any) -> list:
        if type(v) is not list:
            raise SchemaError(f"expected a list, got {_tname(v)}")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x))
            except SchemaError as e:
                raise e.at(f"[{i}]") from None
        return out

    return conv


def _dict_of(key: Callable[[Any], Any], val: Callable[[Any], Any]) -> Callable[[Any], dict]:
    if key is _str and val is _int:  # registers: each item checked inline, as below

        def conv_str_int(v: Any) -> dict:
            if type(v) is not dict:
                raise SchemaError(f"expected a map, got {_tname(v)}")
            out = {}
            for k, x in v.items():
                if type(k) is not str or type(x) is not int or not I64_MIN <= x <= U64:
                    try:
                        out[_str(k)] = _int(x)
                    except SchemaError as e:
                        raise e.at(f"[{k!r}]") from None
                else:
                    out[k] = x
            return out

        return conv_str_int

    def conv(v: Any) -> dict:
        if type(v) is not dict:
            raise SchemaError(f"expected a map, got {_tname(v)}")
        out = {}
        for k, x in v.items():
            try:
                out[key(k)] = val(x)
            except SchemaError as e:
                raise e.at(f"[{k!r}]") from None
        return out

    return conv


def _optional(inner: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def conv(v: Any) -> Any:
        return None if v is None else inner(v)

    return conv


def _union(options: list[Callable[[Any], Any]], nullable: bool) -> Callable[[Any], Any]:
    def conv(v: Any) -> Any:
        if v is None and nullable:
            return None
        for o in options:
            try:
                return o(v)
            except SchemaError:
                continue
        raise SchemaError(f"unexpected {_tname(v)}")

    return conv


@functools.cache
def _conv(tp: Any) -> Callable[[Any], Any]:
    """The checking converter for values of type hint `tp`."""
    if dataclasses.is_dataclass(tp):
        return functools.partial(build, tp)
    if tp in _LEAVES:
        return _LEAVES[tp]
    origin, args = get_origin(tp), get_args(tp)
    if tp is list or origin is list:
        return _list_of(_conv(args[0]) if args else _any)
    if tp is dict or origin is dict:
        return _dict_of(*(_conv(a) for a in args)) if len(args) == 2 else _dict_of(_any, _any)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        nullable = len(rest) < len(args)
        if len(rest) == 1:
            inner = _conv(rest[0])
            return _optional(inner) if nullable else inner
        return _union([_conv(a) for a in rest], nullable)
    return _any  # a hint this checker does not know: taken as is


# ---------------------------------------------------------------- dataclasses


@functools.cache
def _plan(cls: type) -> tuple:
    hints = get_type_hints(cls)
    rules = RANGES.get(cls, {})
    out = []
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out.append((f.name, _conv(hints[f.name]), required, rules.get(f.name)))
    return tuple(out)


def build(cls: type, data: Any) -> Any:
    """An instance of dataclass `cls` from decoded data, every field checked. Keys the
    model does not know are ignored (a newer minor format may add some)."""
    b = _BUILDERS.get(cls)
    return (b if b is not None else _compile(cls))(data)


def _build_generic(cls: type, data: Any) -> Any:
    """build() as one loop over _plan(cls): what _compile's code does field by field."""
    if type(data) is not dict:
        raise SchemaError(f"expected a map ({cls.__name__}), got {_tname(data)}")
    kwargs = {}
    for name, conv, required, rule in _plan(cls):
        if name in data:
            try:
                v = conv(data[name])
                if rule is not None and v is not None:
                    rule(v)
            except SchemaError as e:
                raise e.at("." + name) from None
            kwargs[name] = v
        elif required:
            raise SchemaError("is missing").at("." + name)
    obj = cls(**kwargs)
    check = CHECKS.get(cls)
    if check is not None:
        check(obj)
    return obj


_BUILDERS: dict[type, Callable[[Any], Any]] = {}


def _compile(cls: type) -> Callable[[Any], Any]:
    """build(cls, ·) as straight code, one block per field, integers and integer ranges
    checked inline (a 1024-thread state: ~64k _int calls and as many rule calls were
    most of its ~30 ms). Exactly _build_generic's checks, order and errors: a value
    that fails an inline test goes through the field's converter and rule as there."""
    plan = _plan(cls)
    env: dict[str, Any] = {
        "cls": cls, "SchemaError": SchemaError, "_tname": _tname, "_int": _int,
        "LO": I64_MIN, "HI": U64, "check": CHECKS.get(cls),
    }  # fmt: skip
    lines = [
        "def b(data):",
        "    if type(data) is not dict:",
        f"        raise SchemaError(f'expected a map ({cls.__name__}), got {{_tname(data)}}')",
        "    kw = {}",
    ]
    for i, (name, conv, required, rule) in enumerate(plan):
        env[f"c{i}"], env[f"r{i}"] = conv, rule
        lines += [f"    if {name!r} in data:", f"        v = data[{name!r}]", "        try:"]
        if conv is _int:
            lines.append("            if type(v) is not int or not LO <= v <= HI: v = _int(v)")
        else:
            lines.append(f"            v = c{i}(v)")
        bounds = getattr(rule, "bounds", None)
        if rule is not None and bounds is not None and conv is _int:
            env[f"lo{i}"], env[f"hi{i}"] = bounds
            lines.append(f"            if not lo{i} <= v <= hi{i}: r{i}(v)")
        elif rule is not None:
            lines.append(f"            if v is not None: r{i}(v)")
        lines += [
            "        except SchemaError as e:",
            f"            raise e.at({'.' + name!r}) from None",
            f"        kw[{name!r}] = v",
        ]
        if required:
            lines += ["    else:", f"        raise SchemaError('is missing').at({'.' + name!r})"]
    lines += ["    obj = cls(**kw)"]
    if env["check"] is not None:
        lines += ["    check(obj)"]
    lines += ["    return obj"]
    exec(compile("\n".join(lines), f"<schema build {cls.__name__}>", "exec"), env)
    _BUILDERS[cls] = env["b"]
    return env["b"]


def build_state(data: Any) -> m.ProcessImage:
    """The whole process state (a root and its tree), checked, references included."""
    proc = build(m.ProcessImage, data)
    _check_root(proc)
    _check_flying([proc, *proc.tree])  # files in flight in unix sockets (capture/inflight.py)
    return proc


# ---------------------------------------------------------------- rules


def rng(lo: int, hi: int) -> Callable[[int], None]:
    def rule(v: int) -> None:
        if not lo <= v <= hi:
            raise SchemaError(f"{v} is out of range ({lo} … {hi})")

    rule.bounds = (lo, hi)  # type: ignore[attr-defined]  # (inlined by _compile)
    return rule


def each(lo: int, hi: int, *, n: int | None = None, max_n: int | None = None):
    def rule(v: list) -> None:
        if n is not None and len(v) != n:
            raise SchemaError(f"has {len(v)} values, not {n}")
        if max_n is not None and len(v) > max_n:
            raise SchemaError(f"has {len(v)} values, more than {max_n}")
        for i, x in enumerate(v):
            if not lo <= x <= hi:
                raise SchemaError(f"{x} is out of range ({lo} … {hi})").at(f"[{i}]")

    return rule


def maxlen(n: int) -> Callable[[Any], None]:
    def rule(v: Any) -> None:
        if len(v) > n:
            raise SchemaError(f"is {len(v)} long, more than {n}")

    return rule


def path(*, absolute: bool = False, limit: int = PATH_MAX) -> Callable[[str], None]:
    def rule(v: str) -> None:
        if "\0" in v:
            raise SchemaError("holds a NUL character")
        if len(v) > limit:
            raise SchemaError(f"is {len(v)} long, more than {limit}")
        if absolute and v and not v.startswith("/"):
            raise SchemaError(f"{v!r} is not an absolute path")

    return rule


def sizes(size: int, *, n: int | None = None, max_n: int | None = None):
    """A list of bytes objects of exactly `size` bytes each."""

    def rule(v: list) -> None:
        if max_n is not None and len(v) > max_n:
            raise SchemaError(f"has {len(v)} entries, more than {max_n}")
        for i, b in enumerate(v):
            if len(b) != size:
                raise SchemaError(f"is {len(b)} bytes, not {size}").at(f"[{i}]")

    return rule


_NET_LOCK = re.compile(r"[A-Za-z0-9_]{0,64}")
U = rng(0, U64)
U32R = rng(0, U32)
I32R = rng(I32_MIN, I32_MAX)
ADDR = rng(0, TASK_SIZE)
PID = rng(1, PID_MAX)
PID0 = rng(0, PID_MAX)
FD = rng(-1, FD_MAX - 1)
NS = rng(0, 1 << 62)  # a duration in ns or µs (struct timespec/timeval arithmetic)


def _net_lock(v: str) -> None:
    if not _NET_LOCK.fullmatch(v):
        raise SchemaError(f"{v!r} is not a nftables table name ckpt makes")


SCM_MAX_FD = 253  # the most fds one message carries (SCM_RIGHTS)
# what a socket's in-flight table may hold (capture/inflight.py)
INFLIGHT_KINDS = frozenset({"peer", "file", "dir", "chr", "pipe", "memfd", "eventfd", "socket"})


def _creds(v: list) -> None:
    """SCM_CREDENTIALS of a queued message: none, or [pid, uid, gid]."""
    if v and (len(v) != 3 or not 0 <= v[0] <= PID_MAX or any(not 0 <= x <= U32 for x in v[1:])):
        raise SchemaError(f"{v!r:.60} is not [pid, uid, gid]")


def _tcp_state(v: int) -> None:
    if v not in m.TCP_STATES:
        raise SchemaError(f"{v} is not a TCP state ckpt rebuilds ({sorted(m.TCP_STATES)})")


def _sigaltstack(v: list) -> None:
    """[ss_sp, ss_flags, ss_size] (packed "<QiiQ")."""
    if len(v) != 3 or not (0 <= v[0] <= U64 and I32_MIN <= v[1] <= I32_MAX and 0 <= v[2] <= U64):
        raise SchemaError(f"{v!r:.80} is not [ss_sp, ss_flags, ss_size]")


# fmt: off
RANGES: dict[type, dict[str, Callable[[Any], None]]] = {
    m.ProcessImage: {
        "pid": PID, "ppid": PID0, "pgid": PID0, "sid": PID0, "comm": maxlen(64),
        "exe": path(), "cwd": path(absolute=True), "umask": rng(0, 0o777),
        "personality": U32R, "uids": each(0, U32, max_n=4), "gids": each(0, U32, max_n=4),
        "groups": each(0, U32, max_n=65536), "shared_pending": sizes(SIGINFO),
        "dumpable": rng(0, 2), "child_subreaper": rng(0, 1), "thp_disable": U32R,
        "space": rng(-1, m.MAX_SPACE), "net_lock": _net_lock, "starttime": U,
        "files_of": rng(-1, 1 << 16),
    },
    m.FileRef: {
        "path": path(absolute=True), "dev": U, "ino": U, "size": rng(0, I64_MAX),
        "mtime_ns": rng(I64_MIN, I64_MAX),
    },
    m.SysvShm: {
        "shmid": rng(0, I32_MAX), "key": rng(I32_MIN, U32), "size": rng(1, TASK_SIZE),
        "mode": U32R, "uid": U32R, "gid": U32R,
    },
    m.Vma: {
        "start": ADDR, "end": ADDR, "prot": rng(0, 15), "offset": rng(0, I64_MAX),
        "kind": maxlen(32), "name": path(limit=2 * PATH_MAX),
        "shared_with": each(0, TASK_SIZE, n=2),
        "shm": rng(-1, 1 << 20),
    },
    m.ShmObject: {
        "space": rng(m.SHM_SPACE0, m.MAX_SPACE), "size": rng(1, TASK_SIZE),
        "dev": U, "ino": U,
    },
    m.MemfdState: {
        "name": path(limit=249), "size": rng(0, I64_MAX), "mode": rng(0, 0o7777),
        "seals": U32R, "maps": each(0, TASK_SIZE), "shared_from": rng(-1, 1 << 20),
    },
    m.TimerfdState: {
        "clockid": I32R, "value_ns": NS, "interval_ns": NS, "ticks": U, "settime_flags": I32R,
    },
    m.EpollEntry: {"tfd": rng(0, FD_MAX - 1), "events": U32R, "data": U, "src_fd": FD},
    m.InotifyWatch: {"wd": rng(1, I32_MAX), "mask": U32R, "path": path(), "dev": U, "ino": U},
    m.TtyState: {
        "name": path(), "rdev": U, "pgid": PID0, "termios": maxlen(256), "dev": U,
        "uid": rng(-1, U32), "gid": rng(-1, U32), "holder": PID0, "holder_start": U,
    },
    m.PtyState: {
        "index": rng(0, 1 << 20), "mode": rng(0, 0o7777), "uid": U32R, "gid": U32R,
        "atime_ns": rng(-(1 << 62), 1 << 62), "mtime_ns": rng(-(1 << 62), 1 << 62),
        "output": maxlen(PTY_OUTPUT_MAX),
    },
    m.PidfdState: {"pid": rng(-1, PID_MAX), "start": U},
    m.UnlinkedFile: {"size": rng(0, I64_MAX), "mode": rng(0, 0o7777), "uid": U32R, "gid": U32R},
    m.Fd: {
        "fd": FD, "path": path(limit=2 * PATH_MAX), "flags": U32R, "pos": rng(0, I64_MAX),
        "rdev": U, "dup_of": FD, "obj_id": U, "pipe_size": rng(0, 1 << 31), "count": U,
        "sigmask": U, "peer_slot": rng(-1, 1 << 16), "peer_fd": FD,
    },
    m.FileLock: {"start": rng(0, I64_MAX), "end": rng(-1, I64_MAX)},
    m.SigAction: {"signo": rng(1, 64), "handler": U, "flags": U, "restorer": U, "mask": U},
    m.PosixTimer: {
        "id": rng(0, I32_MAX), "clock_id": I32R, "signo": rng(0, 64),
        "sigev_value": rng(I64_MIN, I64_MAX), "notify": I32R, "notify_tid": PID0,
        "interval_ns": NS, "value_ns": NS,
    },
    m.ITimer: {"which": rng(0, 2), "interval_us": NS, "value_us": NS},
    m.Rseq: {"ptr": ADDR, "size": U32R, "signature": U32R},
    m.Thread: {
        "tid": PID, "xstate": maxlen(1 << 20), "sigmask": U, "pending": sizes(SIGINFO),
        "sigaltstack": _sigaltstack, "robust_list": each(0, U64, n=2),
        "clear_child_tid": U, "comm": maxlen(64),
    },
    m.MmFields: {
        **{
            k: ADDR
            for k in ("start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
                      "start_stack", "arg_start", "arg_end", "env_start", "env_end")
        },
        "auxv": maxlen(8192),
    },
    m.SocketMsg: {
        "source": maxlen(UNIX_PATH), "fds": each(0, SCM_MAX_FD - 1, max_n=SCM_MAX_FD),
        "creds": _creds,
    },
    m.TcpConn: {
        "snd_seq": U32R, "rcv_seq": U32R, "mss": rng(0, 65535), "options": I32R,
        "snd_wscale": rng(0, 14), "rcv_wscale": rng(0, 14), "timestamp": U32R,
        "window": each(0, U32, n=5), "state": _tcp_state,
    },
    m.TcpClosed: {"error": rng(0, 4095), "mss": rng(0, 65535)},  # an errno
    m.Socket: {
        "ino": U, "family": rng(0, 255), "type": rng(0, 15), "protocol": rng(0, 255),
        "peer_ino": U, "listener_ino": U, "backlog": rng(0, I32_MAX), "pending": each(0, U64),
        "shutdown": rng(0, 3), "name_file": each(0, U32, n=3), "sndbuf": rng(0, I32_MAX),
        "rcvbuf": rng(0, I32_MAX), "buf_lock": I32R, "peek_off": rng(-1, I32_MAX),
        "filter": maxlen(BPF_MAXINSNS * 8), "mcast": maxlen(4096),
    },
    m.McastGroup: {"iface": maxlen(15), "sources": maxlen(1024)},
    # process attributes (capture/attrs.py, restore/attrs.py)
    m.SchedAttr: {
        "policy": rng(0, 7), "flags": U, "nice": rng(-20, 19), "priority": rng(0, 99),
        "runtime": U, "deadline": U, "period": U, "util_min": rng(0, 1024),
        "util_max": rng(0, 1024),
    },
    m.ThreadAttrs: {
        "affinity": each(0, (1 << 16) - 1, max_n=1 << 16), "ioprio": I32R, "timerslack": U,
        "pdeathsig": rng(0, 64), "tsc": I32R, "mce_kill": I32R, "cpuid": rng(0, 1),
        "spec": each(I32_MIN, I32_MAX, max_n=16),
    },
    m.ProcAttrs: {
        "oom_score_adj": rng(-1000, 1000), "coredump_filter": U32R,
        "membarrier": rng(-1, I32_MAX), "exit_signal": rng(0, 64),
    },
    # security context (capture/security.py, restore/security.py)
    m.Creds: {
        "uids": each(0, U32, n=4), "gids": each(0, U32, n=4),
        "groups": each(0, U32, max_n=65536), "caps": each(0, U64, n=5),
        "securebits": U32R, "seccomp_mode": rng(0, 2), "seccomp": each(0, 1 << 16),
    },
    m.SeccompFilter: {"prog": maxlen(8 * 4096), "flags": U32R},
    m.SecurityContext: {
        "inherited_filters": rng(0, 1 << 16), "root": path(absolute=True), "loginuid": U32R,
        "lsm": maxlen(PATH_MAX),
    },
    m.CgroupRef: {"hierarchy": rng(0, I32_MAX), "controllers": path(), "path": path()},
}
# fmt: on


def _runs(runs: list, lo: int, hi: int, what: str) -> None:
    """[[start, npages], ...]: page aligned, inside [lo, hi)."""
    for i, r in enumerate(runs):
        if len(r) != 2:
            raise SchemaError(f"has {len(r)} values, not 2", f".{what}[{i}]")
        a, n = r
        if a % PAGE or n < 1 or a < lo or a + n * PAGE > hi:
            msg = f"run ({a:#x}, {n} pages) is not page aligned or not inside {lo:#x}-{hi:#x}"
            raise SchemaError(msg, f".{what}[{i}]")


def _check_vma(v: m.Vma) -> None:
    if v.start % PAGE or v.end % PAGE or v.start >= v.end:
        raise SchemaError(f"{v.start:#x}-{v.end:#x} is not a page-aligned range", ".start")
    if v.offset % PAGE:
        raise SchemaError(f"{v.offset:#x} is not page aligned", ".offset")
    _runs(v.present, v.start, v.end, "present")
    if v.kind in ("file", "unlinked") and v.file is None:
        raise SchemaError("a file mapping without its file", ".file")
    if v.kind == "sysv" and v.sysv is None:
        raise SchemaError("a SysV mapping without its segment", ".sysv")
    for i, f in enumerate(v.vmflags):
        if len(f) > 8:
            raise SchemaError(f"{f[:16]!r} is not a VmFlags mnemonic", f".vmflags[{i}]")


def _check_shm(o: m.ShmObject) -> None:
    _runs(o.present, 0, (o.size + PAGE - 1) // PAGE * PAGE, "present")
    pages = sum(n for _, n in o.present)
    if o.digest and len(o.digest) != 8 * pages:
        raise SchemaError(f"{len(o.digest)} bytes for {pages} pages", ".digest")


def _check_memfd(s: m.MemfdState) -> None:
    for i, e in enumerate(s.extents):
        if len(e) != 2 or type(e[0]) is not int or type(e[1]) is not bytes:
            raise SchemaError("is not [offset, data]", f".extents[{i}]")
        if e[0] < 0 or e[0] + len(e[1]) > s.size:
            msg = f"{len(e[1])} bytes at {e[0]} are outside the memfd's {s.size} bytes"
            raise SchemaError(msg, f".extents[{i}]")


PIPE_DEFAULT = 16 * PAGE  # what a new pipe holds before F_SETPIPE_SZ
PTMX_PATHS = ("/dev/ptmx", "/dev/pts/ptmx")  # (kernel/tty.py's)


def _check_pty(s: m.PtyState) -> None:
    if s.ptmx not in PTMX_PATHS:
        raise SchemaError(f"{s.ptmx[:64]!r} is not a pty multiplexer", ".ptmx")
    if len(s.termios) != 36:  # struct termios of TCGETS
        raise SchemaError(f"{len(s.termios)} bytes is not a struct termios", ".termios")
    if len(s.winsize) != 8:
        raise SchemaError(f"{len(s.winsize)} bytes is not a struct winsize", ".winsize")


def _check_fd(f: m.Fd) -> None:
    if f.kind not in m.FD_KINDS:  # what this ckpt can restore
        raise SchemaError(f"{f.kind[:32]!r} is not an fd kind this ckpt restores", ".kind")
    if f.kind in ("pipe", "fifo", "pipe_end", "pipe_open", "memfd", "socket_end") and not f.obj_id:
        raise SchemaError(f"a {f.kind} without the object it names", ".obj_id")
    if f.kind == "timerfd" and f.timer is None:
        raise SchemaError("a timerfd without its timer", ".timer")
    if f.kind == "tty" and f.tty is None:
        raise SchemaError("a terminal fd without its terminal", ".tty")
    if f.kind == "ptmx" and not f.obj_id:
        raise SchemaError("a pty master without the pty it names", ".obj_id")
    if f.kind in ("pts", "ctty") and not f.obj_id and f.tty is None:
        raise SchemaError(f"a {f.kind} record that names no pty", ".obj_id")
    if f.kind == "ctty" and f.fd != -1:
        raise SchemaError("a controlling terminal record with an fd number", ".fd")
    if f.pty is not None and f.kind != "ptmx":
        raise SchemaError(f"pty state on a {f.kind} record", ".pty")
    if f.kind == "pidfd" and (f.pidfd is None or f.pidfd.pid == 0):
        raise SchemaError("a pidfd without the process it names", ".pidfd")
    if f.kind == "unlinked" and (f.file is None or (f.fd < 0 and f.unlinked is None)):
        raise SchemaError("an unlinked file without its identity or content", ".file")
    if f.kind == "pipe_open" and f.peer_fd < 0:
        raise SchemaError("a pipe opened again through /proc that names no fd", ".peer_fd")
    if f.kind == "dup" and f.dup_of < 0:
        raise SchemaError("a dup of no fd", ".dup_of")
    if f.kind == "peer" and (f.peer_slot < 0 or f.peer_fd < 0):
        raise SchemaError("a shared fd that names no process or fd", ".peer_slot")
    if f.fd < 0 and f.kind not in ("memfd", "socket", "unlinked", "ctty"):
        raise SchemaError(f"fd number -1 for a {f.kind}", ".fd")
    if f.data:  # buffered bytes of a pipe/FIFO must fit the pipe made again
        cap = f.pipe_size or PIPE_DEFAULT
        if len(f.data) > cap:
            msg = f"{len(f.data)} buffered bytes do not fit the pipe's {cap} bytes"
            raise SchemaError(msg, ".data")


def _check_lock(lk: m.FileLock) -> None:
    if lk.kind not in m.LOCK_KINDS:
        raise SchemaError(f"{lk.kind[:32]!r} is not a kind of file lock", ".kind")
    if lk.kind in ("flock", "lease") and (lk.start, lk.end) != (0, -1):
        raise SchemaError(f"a {lk.kind} with a byte range {lk.start}-{lk.end}", ".start")
    if lk.end != -1 and lk.end < lk.start:
        raise SchemaError(f"ends at byte {lk.end}, before its start {lk.start}", ".end")


def _check_socket(s: m.Socket) -> None:
    for field in ("local", "remote"):
        a = getattr(s, field)
        if a is None:
            continue
        if s.family == 1:  # AF_UNIX: a name
            if type(a) is not bytes or len(a) > UNIX_PATH:
                raise SchemaError(f"not a unix socket name ({_tname(a)})", "." + field)
        elif (
            type(a) is not list
            or not 2 <= len(a) <= 4
            or type(a[0]) is not str
            or len(a[0]) > 64
            or any(type(x) is not int or not 0 <= x <= U32 for x in a[1:])
            or a[1] > 65535
        ):
            raise SchemaError(f"not an inet address {a!r:.80}", "." + field)
    for name, value in s.options.items():
        ok = type(name) is str and len(name) <= 64
        ok = ok and (
            (type(value) is int and I32_MIN <= value <= I32_MAX)
            or (type(value) is bytes and len(value) <= 1024)  # an IPv6 extension header
        )
        if not ok:
            msg = f"{value!r:.40} is not a socket option value"
            raise SchemaError(msg, f".options[{name!r:.40}]")
    _check_inflight(s)
    if s.tcp is not None and s.tcp.unsent > len(s.tcp.outq):
        raise SchemaError(f"{s.tcp.unsent} unsent of {len(s.tcp.outq)} bytes", ".tcp.unsent")
    if len(s.filter) % 8:  # struct sock_filter: 8 bytes an instruction
        raise SchemaError(f"{len(s.filter)} bytes is no whole BPF program", ".filter")


def _check_inflight(s: m.Socket) -> None:
    """The files in flight in a unix socket's queue (capture/inflight.py): a table of
    descriptions, each a kind the restore makes (or a tree member's fd: _check_root), and
    messages that name them by index."""
    for i, e in enumerate(s.inflight):
        where = f".inflight[{i}]"
        if e.fd != i:
            raise SchemaError(f"entry {i} names itself {e.fd}", where + ".fd")
        if e.kind not in INFLIGHT_KINDS:
            raise SchemaError(f"{e.kind[:32]!r} is not a file ckpt sends again", where + ".kind")
        if e.kind in ("file", "dir") and e.file is None:
            raise SchemaError(f"a {e.kind} without its identity", where + ".file")
        if e.kind == "socket" and not e.obj_id:
            raise SchemaError("a socket without the record it names", where + ".obj_id")
        if e.socket is not None or e.epoll or e.watches or e.locks or e.content is not None:
            raise SchemaError("holds state no file in flight has", where)
        if e.memfd is not None and (e.memfd.maps or e.memfd.shared_from >= 0):
            raise SchemaError("a memfd in flight with mappings or a maker", where + ".memfd")
    if (s.inflight or any(q.fds or q.creds for q in s.queue)) and s.family != 1:
        raise SchemaError("files or credentials in flight in a socket that is not AF_UNIX")
    for j, q in enumerate(s.queue):
        if any(k >= len(s.inflight) for k in q.fds):
            raise SchemaError(f"an index beyond the {len(s.inflight)} files in flight",
                              f".queue[{j}].fds")  # fmt: skip
        if q.fds and not q.data and s.type == 1:  # SOCK_STREAM: fds go with a byte
            raise SchemaError("files in flight with no byte of a stream", f".queue[{j}].fds")


def _check_flying(members: list[m.ProcessImage]) -> None:
    """Files in flight name what the image holds: a "peer" an fd of a member, a "socket"
    the record (fd -1) of a socket only messages in flight hold, which itself holds no
    files in flight."""
    numbers = [{f.fd for f in p.fds if f.fd >= 0} for p in members]
    flying = {f.socket.ino for p in members for f in p.fds if m.flying_socket(f)}
    for slot, p in enumerate(members):
        base = f".tree[{slot - 1}]" if slot else ""
        for i, f in enumerate(p.fds):
            if f.socket is None:
                continue
            where = f"{base}.fds[{i}].socket"
            if m.flying_socket(f) and (f.socket.inflight or f.socket.family != 1):
                raise SchemaError("a socket in flight that is not a plain unix socket", where)
            for k, e in enumerate(f.socket.inflight):
                if e.kind == "peer" and (
                    e.peer_slot >= len(members) or e.peer_fd not in numbers[e.peer_slot]
                ):
                    raise SchemaError(f"slot {e.peer_slot} fd {e.peer_fd} is not open",
                                      f"{where}.inflight[{k}].peer_fd")  # fmt: skip
                if e.kind == "socket" and e.obj_id not in flying:
                    raise SchemaError(f"socket:[{e.obj_id}] is no socket in flight",
                                      f"{where}.inflight[{k}].obj_id")  # fmt: skip


def _check_mcast(g: m.McastGroup) -> None:
    try:
        group = ipaddress.ip_address(g.group)
        sources = [ipaddress.ip_address(x) for x in g.sources]
    except ValueError as exc:
        raise SchemaError(f"not an IP address ({exc})", ".group") from None
    if not group.is_multicast:
        raise SchemaError(f"{g.group} is not a multicast group", ".group")
    if any(x.version != group.version for x in sources):
        raise SchemaError("a source of another address family than its group", ".sources")
    if g.include and not sources:
        raise SchemaError("an INCLUDE filter without sources is no membership", ".sources")


def _check_thread(t: m.Thread) -> None:
    missing = [r for r in m.REG_NAMES if r not in t.regs]
    if missing:
        raise SchemaError(f"lacks {', '.join(missing[:4])}", ".regs")


def _check_process(p: m.ProcessImage) -> None:
    if not p.threads:
        raise SchemaError("a process without a thread", ".threads")
    if len(p.uids) < 3 or len(p.gids) < 3:
        raise SchemaError("needs real, effective and saved ids", ".uids")
    for k, v in p.rlimits.items():
        if not 0 <= k < 16 or len(v) != 2:
            raise SchemaError(f"limit {k}: {v!r:.40}", ".rlimits")
    numbers = set()
    for i, f in enumerate(p.fds):
        if f.fd >= 0:
            if f.fd in numbers:
                raise SchemaError(f"fd {f.fd} twice", f".fds[{i}]")
            numbers.add(f.fd)
    for i, f in enumerate(p.fds):
        if f.kind == "dup" and f.dup_of not in numbers:
            raise SchemaError(f"a dup of fd {f.dup_of}, which is not open", f".fds[{i}]")
    starts = set()
    for i, v in enumerate(p.vmas):
        if v.start in starts:
            raise SchemaError(f"two mappings at {v.start:#x}", f".vmas[{i}]")
        starts.add(v.start)


def _check_root(root: m.ProcessImage) -> None:
    members = [root, *root.tree]
    for slot, p in enumerate(members):
        where = f".tree[{slot - 1}]" if slot else ""
        if slot and (p.tree or p.shm):
            raise SchemaError("a tree member with a tree or objects of its own", where)
        for i, v in enumerate(p.vmas):
            if v.shm >= len(root.shm):
                raise SchemaError(f"object {v.shm} of {len(root.shm)}", f"{where}.vmas[{i}].shm")
            if v.shared_with is not None and not 0 <= v.shared_with[0] < len(members):
                raise SchemaError(f"slot {v.shared_with[0]}", f"{where}.vmas[{i}].shared_with")
        for i, f in enumerate(p.fds):
            if f.peer_slot >= len(members):
                raise SchemaError(
                    f"slot {f.peer_slot} of {len(members)}", f"{where}.fds[{i}].peer_slot"
                )
            _check_fd_state(f, slot, f"{where}.fds[{i}]")
        _check_ptys(members, p, where)
        if p.files_of >= slot:  # shares the table of an earlier member (clone CLONE_FILES)
            raise SchemaError(f"slot {p.files_of}, not before {slot}", f"{where}.files_of")


def _check_ptys(members: list[m.ProcessImage], p: m.ProcessImage, where: str) -> None:
    """Every pty a slave fd or a controlling terminal names is one whose master the image
    holds (its state on a "ptmx" record); one controlling terminal, on a session leader."""
    made = {f.obj_id for q in members for f in q.fds if f.kind == "ptmx" and f.pty is not None}
    for i, f in enumerate(p.fds):
        if f.kind in ("pts", "ctty", "ptmx") and f.obj_id and f.obj_id not in made:
            raise SchemaError(f"pty {f.obj_id} is not in the image", f"{where}.fds[{i}].obj_id")
    cttys = [i for i, f in enumerate(p.fds) if f.kind == "ctty"]
    if len(cttys) > 1 or (cttys and p.sid != p.pid):
        raise SchemaError("a controlling terminal of a process that leads no session", where)


def _check_fd_state(f: m.Fd, slot: int, where: str) -> None:
    """SIGIO state of an fd (F_GETOWN_EX, F_GETSIG), restored by fcntl as it is; a memfd
    fd that is an earlier member's description names one."""
    if f.kind == "memfd" and f.peer_slot >= 0 and (f.peer_slot >= slot or f.peer_fd < 0):
        raise SchemaError(f"slot {f.peer_slot} fd {f.peer_fd}", f"{where}.peer_slot")
    if f.owner and (len(f.owner) != 2 or f.owner[0] not in (0, 1, 2)
                    or not 0 < f.owner[1] <= PID_MAX):  # fmt: skip
        raise SchemaError(f"{f.owner!r:.40} is not [F_OWNER_* type, pid]", f"{where}.owner")
    if not 0 <= f.sigio <= 64:
        raise SchemaError(f"{f.sigio} is not a signal", f"{where}.sigio")


def _check_security(c: m.SecurityContext) -> None:
    for i, f in enumerate(c.filters):
        if len(f.prog) % 8 or not f.prog:
            raise SchemaError(f"{len(f.prog)} bytes is not a BPF program", f".filters[{i}].prog")
    for i, t in enumerate(c.threads):
        for j, k in enumerate(t.seccomp):
            if k >= len(c.filters):
                raise SchemaError(f"filter {k} of {len(c.filters)}", f".threads[{i}].seccomp[{j}]")


CHECKS: dict[type, Callable[[Any], None]] = {
    m.SecurityContext: _check_security,
    m.Vma: _check_vma,
    m.ShmObject: _check_shm,
    m.MemfdState: _check_memfd,
    m.UnlinkedFile: _check_memfd,  # the same rule: extents inside the size
    m.Fd: _check_fd,
    m.PtyState: _check_pty,
    m.FileLock: _check_lock,
    m.Socket: _check_socket,
    m.McastGroup: _check_mcast,
    m.Thread: _check_thread,
    m.ProcessImage: _check_process,
}
