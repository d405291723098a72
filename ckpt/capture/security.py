"""The security context of a process at the dump: who each thread is (uids, gids,
groups, the five capability sets, securebits, no_new_privs), its seccomp filters,
its root directory, loginuid, LSM label and cgroups; and the namespaces, which ckpt
refuses before anything else when they are not its own.

Read while the process is frozen: /proc (per thread: /proc/PID/task/TID/status),
ptrace (PTRACE_SECCOMP_GET_FILTER) and, for securebits (no /proc view), an injected
PR_GET_SECUREBITS in each thread. restore/security.py puts it back.
"""

from __future__ import annotations

import os

from ..errors import NoSuchProcess, UnsupportedProcess
from ..kernel import abi, cgroups, creds, native, procfs, seccomp, syscalls
from ..kernel.ptrace import Tracee
from ..kernel.remote import Injector
from ..model import CgroupRef, Creds, ProcessImage, SeccompFilter, SecurityContext


def _who(pid: int, root: int | None = None) -> str:
    try:
        comm = procfs.stat(pid).comm.decode(errors="replace")
    except NoSuchProcess:
        comm = "?"
    who = f"process {pid} ({comm})"
    return who + (f", a descendant of {root}," if root is not None and root != pid else "")


def check_namespaces(pid: int, root: int | None = None) -> None:
    """Refuse (exit 5) a process whose namespaces are neither ckpt's own nor the
    machine's initial ones: a restored process lives in the restoring ckpt's, so it
    would silently come back in other ones. Runs before anything touches the process.

    The initial ones are accepted too because `ckpt migrate` runs in the source host's
    network and mount namespaces (`ip netns exec`) while the process it moves is in the
    host's (a migrated process is meant to come back in the destination's)."""
    theirs = creds.namespaces(pid)
    mine = creds.namespaces("self")
    for kind in creds.NAMESPACES:
        t = theirs.get(kind)
        if t is None or t == mine.get(kind) or creds.is_initial(kind, t):
            continue
        raise UnsupportedProcess(
            f"{_who(pid, root)} runs in its own {kind} namespace ({t}; ckpt runs in "
            f"{mine.get(kind)}): not supported (it would come back in ckpt's)",
            pid=root or pid,
        )


def check_tree_namespaces(pid: int) -> None:
    """check_namespaces for pid's descendants as they are now (a tree dump)."""
    from .tree import descendants

    for d in descendants(pid):
        try:
            check_namespaces(d, pid)
        except NoSuchProcess:
            continue


def capture(tracee: Tracee, bits_of: dict[int, int]) -> SecurityContext:
    """Everything but the namespaces, for a frozen process; bits_of: each thread's
    securebits, read by `securebits()` in its injection session (capture/process.py)."""
    pid = tracee.pid
    threads = tracee.threads
    tcreds = [creds.parse_creds(t.status()) for t in threads]  # read once per freeze
    bits = [bits_of[t.pid] for t in threads]
    own_mode, own_filters = seccomp.own_mode()
    sec = SecurityContext(threads=[])
    index: dict[tuple[int, bytes, int], int] = {}
    for t, c, sb in zip(threads, tcreds, bits):
        ids: list[int] = []
        if c.seccomp_mode == seccomp.SECCOMP_MODE_FILTER and not own_mode:
            for prog, flags in seccomp.filters(t.pid):
                if seccomp.returns_user_notif(prog):
                    raise UnsupportedProcess(
                        f"{_who(pid)}, thread {t.pid}: a seccomp filter hands syscalls to a "
                        "supervisor (SECCOMP_RET_USER_NOTIF): not supported",
                        pid=pid,
                    )
                # the same program on the same prefix is the same filter object (CRIU's
                # rule: the kernel shows no identity): inherited at clone, or TSYNC'd
                key = (ids[-1] if ids else -1, prog, flags)
                if key not in index:
                    index[key] = len(sec.filters)
                    sec.filters.append(SeccompFilter(prog, flags))
                ids.append(index[key])
        sec.threads.append(
            Creds(
                uids=c.uids, gids=c.gids, groups=c.groups, caps=c.caps, securebits=sb,
                no_new_privs=c.no_new_privs, seccomp_mode=c.seccomp_mode, seccomp=ids,
            )
        )  # fmt: skip
    if own_mode and any(c.seccomp_mode for c in tcreds):
        sec.inherited_filters = own_filters
    sec.root = _root(pid)
    sec.loginuid = creds.loginuid(pid)
    sec.lsm = _lsm(pid)
    sec.cgroups = _cgroups(pid, [t.pid for t in threads])
    sec.plain = _plain(sec)
    return sec


def finish(proc: ProcessImage, sec: SecurityContext) -> None:
    """Checks that need the process's fds; then the context joins the image."""
    if sec.root != "/":
        for f in proc.fds:
            s = f.socket
            names = (s.local, s.remote) if s is not None and s.family == abi.AF_UNIX else ()
            if any(isinstance(n, bytes) and n and not n.startswith(b"\0") for n in names):
                raise UnsupportedProcess(
                    f"{_who(proc.pid)} is chrooted to {sec.root} and fd {f.fd} is a unix "
                    "socket named by a path inside it: not supported",
                    pid=proc.pid,
                )
    proc.security = sec


def _plain(sec: SecurityContext) -> bool:
    """Would a reader that ignores the context (format <= 3: the leader's uids, gids and
    groups set on every thread, from a fork of itself) restore the same process?"""
    me = creds.thread_creds(os.getpid(), os.getpid())
    if sec.root != "/" or sec.loginuid != creds.loginuid("self"):
        return False
    if [(c.controllers, c.path) for c in sec.cgroups] != [
        (m.controllers, m.path) for m in cgroups.of(os.getpid())
    ]:
        return False
    lead = sec.threads[0]
    my_bits = native.syscall(157, abi.PR_GET_SECUREBITS)
    for c in sec.threads:
        if (c.seccomp_mode and not sec.inherited_filters) or c.no_new_privs != lead.no_new_privs:
            return False
        if (c.uids, c.gids, c.groups) != (lead.uids, lead.gids, lead.groups):
            return False
        if c.uids[:3] == [0, 0, 0] and c.gids[:3] == [0, 0, 0]:  # kept ckpt's credentials
            same = c.caps == me.caps and c.groups == me.groups and c.securebits == my_bits
            if not same or c.uids[3] or c.gids[3]:
                return False
        elif c.caps != [0, 0, 0, me.caps[3], 0] or c.securebits != my_bits:
            return False  # setresuid from root leaves no capabilities
        elif c.uids[3] != c.uids[1] or c.gids[3] != c.gids[1]:
            return False
    return True


def securebits(inj: Injector) -> int:
    """The calling thread's securebits (they belong to its credentials; no /proc view)."""
    return syscalls.prctl(inj, abi.PR_GET_SECUREBITS, 0, 0, 0, 0)


def _root(pid: int) -> str:
    path, dev, ino = creds.root(pid)
    if path == "/":
        return path
    try:
        st = os.stat(path, follow_symlinks=False)
        same = (st.st_dev, st.st_ino) == (dev, ino)
    except OSError:
        same = False
    if not same or not path.startswith("/"):
        raise UnsupportedProcess(
            f"{_who(pid)} is chrooted to {path!r}, which ckpt cannot find from its own "
            "root: not supported",
            pid=pid,
        )
    return path


def _lsm(pid: int) -> str:
    label, mine = creds.lsm_label(pid), creds.lsm_label("self")
    if label != mine:
        raise UnsupportedProcess(
            f"{_who(pid)} has the LSM label {label!r} (ckpt's is {mine!r}): not supported "
            "(ckpt cannot set another label)",
            pid=pid,
        )
    return label


def _cgroups(pid: int, tids: list[int]) -> list[CgroupRef]:
    raw = procfs.read_bytes(pid, "cgroup")
    mine = cgroups.parse(raw)
    for tid, text in zip(tids[1:], procfs.read_task_files(pid, tids[1:], "cgroup")):
        if text is None:
            continue  # a thread that exited
        theirs = mine if text == raw else cgroups.parse(text)  # parsed only when it differs
        if theirs != mine:
            diff = sorted({m.what for m in theirs} - {m.what for m in mine})
            raise UnsupportedProcess(
                f"{_who(pid)}: thread {tid} is in another cgroup than its process "
                f"({', '.join(diff)}): not supported",
                pid=pid,
            )
    return [CgroupRef(m.hierarchy, m.controllers, m.path) for m in mine]
