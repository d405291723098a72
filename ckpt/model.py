"""Dataclasses of captured process state: what an image's state file holds.

One root object (ProcessImage); each part knows its own fields. Serialized
with dataclasses.asdict → msgpack; `from_dict` rebuilds it and ignores keys it
does not know (a newer minor format may add fields).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")


@dataclass
class FileRef:
    """Identity of a file at dump time, to refuse restoring against a changed file."""

    path: str
    dev: int
    ino: int
    size: int
    mtime_ns: int


@dataclass
class Vma:
    start: int
    end: int
    prot: int  # PROT_* bits
    shared: bool
    kind: str  # "anon", "file", "shmem", "heap", "stack", "vdso", "vvar", "vvar_vclock"
    name: str
    offset: int = 0
    vmflags: list[str] = field(default_factory=list)
    file: FileRef | None = None
    # Pages holding data at the final freeze, as [vaddr, npages] runs; data is in the layers.
    present: list[list[int]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass
class Fd:
    fd: int
    kind: str  # "file", "chr"
    path: str
    flags: int  # open flags without O_CLOEXEC
    cloexec: bool
    pos: int
    file: FileRef | None = None
    rdev: int = 0
    dup_of: int = -1  # another fd of the process sharing this open file description


@dataclass
class SigAction:
    signo: int
    handler: int
    flags: int
    restorer: int
    mask: int


@dataclass
class PosixTimer:
    id: int
    clock_id: int
    signo: int
    sigev_value: int
    notify: int  # SIGEV_* value
    notify_tid: int
    interval_ns: int
    value_ns: int  # remaining time; 0 = disarmed


@dataclass
class ITimer:
    which: int
    interval_us: int
    value_us: int


@dataclass
class Rseq:
    ptr: int
    size: int
    signature: int


@dataclass
class Thread:
    tid: int
    regs: dict[str, int]
    xstate: bytes
    sigmask: int
    pending: list[bytes]  # 128-byte siginfos of the thread's private queue
    sigaltstack: list[int]  # [ss_sp, ss_flags, ss_size]
    rseq: Rseq | None
    robust_list: list[int]  # [head, len]
    clear_child_tid: int


@dataclass
class MmFields:
    start_code: int
    end_code: int
    start_data: int
    end_data: int
    start_brk: int
    brk: int
    start_stack: int
    arg_start: int
    arg_end: int
    env_start: int
    env_end: int
    auxv: bytes
    exe: FileRef | None


@dataclass
class ProcessImage:
    pid: int
    ppid: int
    pgid: int
    sid: int
    comm: bytes
    cmdline: bytes
    exe: str
    cwd: str
    umask: int
    personality: int
    uids: list[int]
    gids: list[int]
    groups: list[int]
    rlimits: dict[int, list[int]]
    mm: MmFields
    vmas: list[Vma]
    fds: list[Fd]
    sigactions: list[SigAction]
    shared_pending: list[bytes]
    itimers: list[ITimer]
    posix_timers: list[PosixTimer]
    threads: list[Thread]
    no_new_privs: bool = False
    dumpable: int = 1
    child_subreaper: int = 0
    thp_disable: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProcessImage:
        return from_dict(cls, data)


def from_dict(cls: type[T], data: Any) -> T:
    """Rebuild a dataclass tree from plain data (as msgpack returns it)."""
    hints = get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            continue
        kwargs[f.name] = _convert(hints[f.name], data[f.name])
    return cls(**kwargs)


def _convert(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = get_origin(tp)
    args = get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value)
    if origin is list and args:
        return [_convert(args[0], v) for v in value]
    if origin is dict and len(args) == 2:
        return {_convert(args[0], k): _convert(args[1], v) for k, v in value.items()}
    if args and type(None) in args:  # Optional[X]
        inner = next(a for a in args if a is not type(None))
        return _convert(inner, value)
    return value
