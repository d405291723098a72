"""Put a process's security context back (capture/security.py), in an order that
keeps ckpt able to do the rest:

    check        before anything is built: capabilities ckpt lacks, a cgroup or root
                 directory that is gone, an LSM label it cannot set (exit 11)
    cgroups      the restorer enters the process's cgroups when it is created, before
                 its memory is filled (charged there) and its children are forked
    files        after the fds and the cwd: loginuid (by the process itself, through
                 /proc/self/loginuid), then chroot (fchdir to an O_PATH fd of the root
                 opened without following symlinks, chroot("."), fchdir back)
    creds        last, per thread: groups, gids, fsgid; keepcaps, uids, effective back,
                 fsuid; inheritable (while the bounding set is still whole), ambient,
                 bounding, securebits; then seccomp (the filters threads share once,
                 from the leader with TSYNC, then each thread's own), no_new_privs, the
                 final capability sets, strict mode

The restorer is traced with PTRACE_O_SUSPEND_SECCOMP from the creds step on, so
the filters it installs do not apply to the syscalls ckpt injects afterwards
(rseq, dumpable, munmap of the scratch area); they apply from the detach on.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ImageCorrupt, RestoreError
from ..kernel import abi, cgroups, creds, procfs, program, seccomp, syscalls
from ..kernel.ptrace import PTRACE_O_EXITKILL, PTRACE_O_TRACESYSGOOD
from ..kernel.remote import Injector, RemoteError
from ..model import Creds, ProcessImage, SecurityContext

INH, PRM, EFF, BND, AMB = range(5)


def _u(v: int) -> int:
    return v & 0xFFFFFFFFFFFFFFFF


# ---------------------------------------------------------------- before anything is built


def validate(proc: ProcessImage) -> None:
    """The context is one restore_creds can follow (ImageCorrupt, exit 6, if not)."""
    sec = proc.security
    if len(sec.threads) != len(proc.threads):
        raise ImageCorrupt(
            f"process {proc.pid}: {len(sec.threads)} credentials for {len(proc.threads)} threads"
        )
    for f in sec.filters:
        if not f.prog or len(f.prog) % 8 or len(f.prog) > 8 * abi.BPF_MAXINSNS:
            raise ImageCorrupt(f"process {proc.pid}: a seccomp filter of {len(f.prog)} bytes")
    for c in sec.threads:
        ids = [*c.uids, *c.gids, *c.groups]
        if len(c.uids) != 4 or len(c.gids) != 4 or len(c.caps) != 5 or len(c.groups) > 65536:
            raise ImageCorrupt(f"process {proc.pid}: malformed credentials")
        if any(not 0 <= i <= 0xFFFFFFFF for i in ids) or any(not 0 <= x < 1 << 64 for x in c.caps):
            raise ImageCorrupt(f"process {proc.pid}: credentials out of range")
        if any(not 0 <= i < len(sec.filters) for i in c.seccomp) or c.seccomp_mode not in (0, 1, 2):
            raise ImageCorrupt(f"process {proc.pid}: seccomp state out of range")
    if not sec.root.startswith("/"):
        raise ImageCorrupt(f"process {proc.pid}: root directory {sec.root!r} is not absolute")


def check(proc: ProcessImage) -> None:
    """What this ckpt cannot give the process, found before anything is built."""
    sec = proc.security
    if sec is None:
        return
    validate(proc)
    me = creds.thread_creds(os.getpid(), os.getpid())
    for i, c in enumerate(sec.threads):
        who = f"process {proc.pid}" + (f", thread {proc.threads[i].tid}," if i else "")
        lacks = [
            (PRM, c.caps[PRM] & ~me.caps[PRM]),
            (BND, c.caps[BND] & ~me.caps[BND]),
            (INH, c.caps[INH] & ~(me.caps[INH] | me.caps[BND])),
        ]
        for which, mask in lacks:
            if mask:
                raise RestoreError(
                    f"{who} had {creds.cap_names(mask)} in its {creds.CAP_SETS[which]} "
                    "capabilities, which ckpt itself lacks: restore from a ckpt that has them"
                )
        if me.no_new_privs and not c.no_new_privs:
            raise RestoreError(
                f"{who} ran without no_new_privs, but ckpt runs with it (it cannot be undone)"
            )
    if any(c.seccomp_mode for c in sec.threads) and not sec.inherited_filters:
        own = seccomp.own_mode()
        if own[0]:
            raise RestoreError(
                f"process {proc.pid} has seccomp filters, but ckpt itself runs under seccomp "
                f"(mode {own[0]}): it cannot suspend them while it restores"
            )
    if sec.root != "/":
        try:
            os.close(creds.open_dir_nofollow(sec.root))
        except OSError as exc:
            raise RestoreError(
                f"the root directory of process {proc.pid}, {sec.root}, cannot be opened: "
                f"{exc.strerror}"
            ) from exc
    label = creds.lsm_label("self")
    if sec.lsm != label:
        raise RestoreError(
            f"process {proc.pid} had the LSM label {sec.lsm!r}; ckpt cannot set it (its own "
            f"is {label!r})"
        )
    mnts = cgroups.mounts()
    for m in _moves(sec, cgroups.of(os.getpid())):
        try:
            os.close(cgroups.open_cgroup(m, mnts))
        except OSError as exc:
            raise RestoreError(f"process {proc.pid}: {exc.strerror}") from exc


# ---------------------------------------------------------------- cgroups


def _moves(sec: SecurityContext, current: list[cgroups.Membership]) -> list[cgroups.Membership]:
    """The image's cgroups a process now in `current` must be moved to."""
    now = {frozenset(c.controllers.split(",")) - {""}: c.path for c in current}
    out = []
    for ref in sec.cgroups:
        m = cgroups.Membership(ref.hierarchy, ref.controllers, ref.path)
        have = now.get(frozenset(ref.controllers.split(",")) - {""})
        if have == m.path or (have is None and m.path == "/"):
            continue
        out.append(m)
    return out


def enter_cgroups(pid: int, proc: ProcessImage) -> bool:
    """Move a new restorer `pid` (before its memory and children) into the cgroups of
    `proc`; False when the image does not say them yet (a staged restore's layout)."""
    sec = getattr(proc, "security", None)
    if sec is None:
        return False
    mnts = cgroups.mounts()
    for m in _moves(sec, cgroups.of(pid)):
        try:
            cgroups.move(pid, m, mnts)
        except OSError as exc:
            why = exc.strerror if isinstance(exc, cgroups.CgroupGone) else f"{m.what}: {exc}"
            raise RestoreError(
                f"cannot put process {proc.pid} back into its cgroup: {why}"
            ) from exc
    return True


# ---------------------------------------------------------------- loginuid, root


def restore_files_context(rb) -> None:
    """After the fds and the cwd, before the threads: loginuid, then the root."""
    sec = rb.proc.security
    if sec is None:
        return
    rb.enter_cgroups()  # a staged restore learns the cgroups only now
    inj: Injector = rb.inj
    pid = rb.proc.pid
    if sec.loginuid is not None and creds.loginuid(rb.pid) not in (None, sec.loginuid):
        inj.reset_data()
        text = str(sec.loginuid).encode()
        try:
            fd = syscalls.openat(
                inj,
                _u(abi.AT_FDCWD),
                inj.cstr(procfs.in_target("self", "loginuid")),
                abi.O_WRONLY,
                0,
            )
            try:
                syscalls.write(inj, fd, inj.put(text), len(text))
            finally:
                syscalls.close(inj, fd)
        except RemoteError as exc:
            raise RestoreError(
                f"cannot set the loginuid of process {pid} to {sec.loginuid}: {exc.strerror} "
                "(ckpt needs CAP_AUDIT_CONTROL, and the audit feature loginuid_immutable off)"
            ) from exc
    if sec.root != "/":
        inj.reset_data()
        flags = creds.O_PATH | creds.O_DIRECTORY | creds.O_CLOEXEC
        how = inj.put(
            creds.open_how(flags, creds.RESOLVE_NO_SYMLINKS | creds.RESOLVE_NO_MAGICLINKS)
        )
        try:
            cwd = syscalls.openat(inj, _u(abi.AT_FDCWD), inj.cstr("."), flags, 0)
            try:
                root = syscalls.openat2(inj, _u(abi.AT_FDCWD), inj.cstr(sec.root), how, 24)
                try:
                    syscalls.fchdir(inj, root)
                    syscalls.chroot(inj, inj.cstr("."))
                finally:
                    syscalls.close(inj, root)
                syscalls.fchdir(inj, cwd)
            finally:
                syscalls.close(inj, cwd)
        except RemoteError as exc:
            raise RestoreError(
                f"cannot chroot process {pid} to {sec.root}: {exc.strerror}"
            ) from exc


# ---------------------------------------------------------------- credentials


@dataclass
class _Now:
    """What a thread of the restorer has at the moment (starts as ckpt's)."""

    uids: list[int]
    gids: list[int]
    groups: list[int]
    caps: list[int]
    securebits: int
    no_new_privs: bool

    def take(self, other: _Now) -> None:
        """Become what `other` is (a copy)."""
        self.uids, self.gids = list(other.uids), list(other.gids)
        self.groups, self.caps = list(other.groups), list(other.caps)
        self.securebits, self.no_new_privs = other.securebits, other.no_new_privs


def restore_creds(rb) -> None:
    """Every thread's credentials, capabilities, securebits, seccomp (see the module
    docstring for the order). rb: the Rebuilder, its threads created."""
    proc: ProcessImage = rb.proc
    sec = proc.security
    validate(proc)
    ents = [(proc.threads[0].tid, rb.tracee, rb.inj)]
    ents += [(t.tid, tr, ti) for t, tr, ti in rb.threads]
    start = creds.thread_creds(rb.pid, rb.pid)
    sb = syscalls.prctl(rb.inj, abi.PR_GET_SECUREBITS, 0, 0, 0, 0)
    nows = [
        _Now(list(start.uids), list(start.gids), list(start.groups), list(start.caps), sb,
             start.no_new_privs)
        for _ in ents
    ]  # fmt: skip
    if any(c.seccomp_mode for c in sec.threads) and not sec.inherited_filters:
        for _, tr, _ in ents:  # from here on, ckpt's own syscalls pass the new filters
            seccomp.suspend(tr.pid, PTRACE_O_TRACESYSGOOD | PTRACE_O_EXITKILL)
    _step(rb, ents[0][0], "credentials", _identity, rb.inj, sec.threads[0], nows[0], rb.pid,
          rb.pid)  # fmt: skip
    _alike(rb, ents[1:], sec.threads[1:], nows[1:], "credentials",
           lambda inj, c, now, tr: _identity(inj, c, now, rb.pid, tr.pid),
           lambda c, now: (*map(tuple, (c.uids, c.gids, c.groups, c.caps)), c.securebits))  # fmt: skip
    # filters every thread shares: installed once, by the leader, with TSYNC
    shared = _common_prefix([c.seccomp for c in sec.threads]) if len(ents) > 1 else []
    if shared:
        _step(rb, ents[0][0], "seccomp", _filters, rb.inj, sec, shared, True)
    own = [c.seccomp[len(shared) :] or c.seccomp_mode == seccomp.SECCOMP_MODE_STRICT
           for c in sec.threads]  # fmt: skip
    for i, ((tid, _tr, inj), c, now) in enumerate(zip(ents, sec.threads, nows)):
        if i and not any(own[1:]):  # the others: alike threads at once (below)
            break
        _step(rb, tid, "seccomp", _filters, inj, sec, c.seccomp[len(shared) :])
        _step(rb, tid, "capabilities", _final, inj, c, now)
    else:
        return
    _alike(rb, ents[1:], sec.threads[1:], nows[1:], "capabilities",
           lambda inj, c, now, _tr: _final(inj, c, now),
           lambda c, now: (c.no_new_privs, tuple(c.caps), c.seccomp_mode))  # fmt: skip


def _alike(rb, ents: list, cs: list[Creds], nows: list[_Now], what: str,
           fn: Callable[[object, Creds, _Now, object], None],
           key: Callable[[Creds, _Now], tuple]) -> None:  # fmt: skip
    """fn(injector, creds, now, tracee) for each of these threads, in a way that costs
    one injected program per thread rather than a round trip per call: threads that are
    to become alike (key) from alike states (now) make the same calls with the same
    results, so the first of each kind runs fn for real, its calls noted
    (program.Recording), and the others run those calls as one injected program each,
    all at once, every result checked against the first's (program.same_as); a failure
    is raised for the first thread in order, worded as fn's own would be."""
    firsts: dict[tuple, tuple[program.Recording, _Now]] = {}
    copies: list[tuple[int, program.Recording, _Now]] = []
    for i, ((tid, tr, inj), c, now) in enumerate(zip(ents, cs, nows)):
        k = (key(c, now), *map(tuple, (now.uids, now.gids, now.groups, now.caps)),
             now.securebits, now.no_new_privs)  # fmt: skip
        got = firsts.get(k)
        if got is not None and got[0].ok:
            copies.append((i, *got))
            continue
        rec = program.Recording(inj)
        _step(rb, tid, what, fn, rec, c, now, tr)
        firsts.setdefault(k, (rec, now))
    progs: dict[int, program.Program] = {}
    for rec in {id(r): r for _i, r, _n in copies}.values():
        which = [i for i, r, _n in copies if r is rec]
        for i, prog in zip(which, rb.replay(rec, [ents[i][1] for i in which]), strict=True):
            progs[i] = prog
    for i, rec, now in copies:
        _step(rb, ents[i][0], what, program.same_as, rec, progs[i])
        nows[i].take(now)  # where the first one got to


def _step(rb, tid: int, what: str, fn, *args) -> None:
    try:
        fn(*args)
    except RemoteError as exc:
        pid = rb.proc.pid
        who = f"process {pid}" + (f", thread {tid}" if tid != pid else "")
        raise RestoreError(f"cannot restore the {what} of {who}: {exc}") from exc


def _common_prefix(chains: list[list[int]]) -> list[int]:
    out: list[int] = []
    for ids in zip(*chains):
        if any(i != ids[0] for i in ids):
            break
        out.append(ids[0])
    return out


def _bits(mask: int):
    return (i for i in range(64) if mask >> i & 1)


def _capset(inj: Injector, eff: int, prm: int, inh: int) -> None:
    inj.reset_data()
    hdr = inj.put(struct.pack("<Ii", abi.CAP_V3, 0))
    lo, hi = 0xFFFFFFFF, 32
    data = struct.pack(
        "<6I", eff & lo, prm & lo, inh & lo, eff >> hi & lo, prm >> hi & lo, inh >> hi & lo
    )
    syscalls.capset(inj, hdr, inj.put(data))


def _setfs(inj: Injector, setfs: Callable[[Injector, int], int], want: int, what: str) -> None:
    """setfsuid/setfsgid never fail: they return the old value. Check the new one."""
    setfs(inj, want)
    got = setfs(inj, 0xFFFFFFFF)  # an invalid id changes nothing and returns the current
    if got != want:
        raise RemoteError(errno.EPERM, f"{what}({want}) left it at {got}")


def _refresh(now: _Now, pid: int, tid: int) -> None:
    """uid changes clear capabilities by the kernel's rules: read what is left."""
    c = creds.thread_creds(pid, tid)
    now.uids, now.gids, now.caps = list(c.uids), list(c.gids), list(c.caps)


def _identity(inj: Injector, c: Creds, now: _Now, pid: int, tid: int) -> None:
    """Groups, gids, uids, fs ids, inheritable/ambient/bounding sets and securebits of
    the calling thread, while it still has ckpt's capabilities to do it."""
    if c.groups != now.groups:
        inj.reset_data()
        raw = struct.pack(f"<{len(c.groups)}I", *c.groups)
        syscalls.setgroups(inj, len(c.groups), inj.put(raw) if raw else 0)
        now.groups = list(c.groups)
    if c.gids[:3] != now.gids[:3]:
        syscalls.setresgid(inj, *c.gids[:3])
        now.gids = [*c.gids[:3], c.gids[1]]
    if c.gids[3] != now.gids[3]:
        _setfs(inj, syscalls.setfsgid, c.gids[3], "setfsgid")
        now.gids[3] = c.gids[3]
    if c.uids[:3] != now.uids[:3]:
        # keep the permitted set across leaving uid 0, then raise the effective one again
        syscalls.prctl(inj, abi.PR_SET_KEEPCAPS, 1, 0, 0, 0)
        now.securebits |= abi.SECBIT_KEEP_CAPS
        syscalls.setresuid(inj, *c.uids[:3])
        _refresh(now, pid, tid)
        _capset(inj, now.caps[PRM], now.caps[PRM], now.caps[INH])
        now.caps[EFF] = now.caps[PRM]
    if c.uids[3] != now.uids[3]:
        _setfs(inj, syscalls.setfsuid, c.uids[3], "setfsuid")
        _refresh(now, pid, tid)
    if c.caps[INH] != now.caps[INH]:  # before the bounding set shrinks
        _capset(inj, now.caps[EFF], now.caps[PRM], c.caps[INH])
        now.caps[INH] = c.caps[INH]
    if now.caps[AMB] & ~c.caps[AMB]:
        syscalls.prctl(inj, abi.PR_CAP_AMBIENT, abi.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        now.caps[AMB] = 0
    for cap in _bits(c.caps[AMB] & ~now.caps[AMB]):
        syscalls.prctl(inj, abi.PR_CAP_AMBIENT, abi.PR_CAP_AMBIENT_RAISE, cap, 0, 0)
    now.caps[AMB] = c.caps[AMB]
    for cap in _bits(now.caps[BND] & ~c.caps[BND]):
        syscalls.prctl(inj, abi.PR_CAPBSET_DROP, cap, 0, 0, 0)
    now.caps[BND] = c.caps[BND]
    if c.securebits != now.securebits:
        syscalls.prctl(inj, abi.PR_SET_SECUREBITS, c.securebits, 0, 0, 0)
        now.securebits = c.securebits


def _filters(inj: Injector, sec: SecurityContext, ids: list[int], tsync: bool = False) -> None:
    """Install filters (oldest first) in the calling thread, or with TSYNC in all."""
    for i in ids:
        f = sec.filters[i]
        flags = (f.flags & seccomp.SECCOMP_FILTER_FLAG_LOG) | (
            seccomp.SECCOMP_FILTER_FLAG_TSYNC if tsync else 0
        )
        n = len(f.prog) // 8
        inj.reset_data()
        tmp = 0
        if len(f.prog) + 64 > inj.scratch.data_size:  # a big program: its own mapping
            size = (len(f.prog) + 4095) // 4096 * 4096
            rw, private = abi.PROT_READ | abi.PROT_WRITE, abi.MAP_PRIVATE | abi.MAP_ANONYMOUS
            tmp = syscalls.mmap(inj, 0, size, rw, private, _u(-1), 0)
            inj.write(tmp, f.prog)
            prog = tmp
        else:
            prog = inj.put(f.prog)
        try:
            fprog = inj.put(struct.pack("<HxxxxxxQ", n, prog))
            r = syscalls.seccomp(inj, seccomp.SECCOMP_SET_MODE_FILTER, flags, fprog)
        finally:
            if tmp:
                syscalls.munmap(inj, tmp, size)
        if r != 0:  # TSYNC: the TID of a thread that could not be synced
            raise RemoteError(errno.EBUSY, f"seccomp TSYNC: thread {r} could not be synced")


def _final(inj: Injector, c: Creds, now: _Now) -> None:
    """no_new_privs, the final capability sets, strict mode: the last of the thread."""
    if c.no_new_privs and not now.no_new_privs:
        syscalls.prctl(inj, abi.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        now.no_new_privs = True
    if [c.caps[EFF], c.caps[PRM], c.caps[INH]] != [now.caps[EFF], now.caps[PRM], now.caps[INH]]:
        _capset(inj, c.caps[EFF], c.caps[PRM], c.caps[INH])
    if c.seccomp_mode == seccomp.SECCOMP_MODE_STRICT:
        syscalls.seccomp(inj, seccomp.SECCOMP_SET_MODE_STRICT, 0, 0)
