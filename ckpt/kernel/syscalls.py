"""Typed wrappers for the syscalls ckpt injects into a stopped tracee (kernel/remote.py).

One function per syscall, `syscalls.mmap(inj, addr, length, prot, flags, fd, offset)`,
instead of `inj.call("mmap", …)` with the name as a string: a misspelt syscall or a
wrong argument count is an AttributeError or TypeError at the call site, seen by type
checkers and by tests/test_syscalls.py (which binds every call site in ckpt against
these signatures). Each returns the syscall's result and raises remote.RemoteError for
a failure (-errno), naming the syscall and the process.

`inj` is anything with `call_nr` and `raw`: remote.Injector, and inject_batch's
Recorder and Replayer, which run the same code for many threads at once. A call
that wants the raw result (a negative errno instead of an exception, e.g. a best
effort madvise) uses `inj.raw(abi.NR_X, …)` directly.
"""

from __future__ import annotations

from typing import Protocol

from . import abi


class Injection(Protocol):
    def raw(self, nr: int, *args: int) -> int: ...

    def call_nr(self, nr: int, *args: int, name: str) -> int: ...


# -- files -----------------------------------------------------------------------------------


def write(inj: Injection, fd: int, buf: int, count: int) -> int:
    return inj.call_nr(abi.NR_WRITE, fd, buf, count, name="write")


def close(inj: Injection, fd: int) -> int:
    return inj.call_nr(abi.NR_CLOSE, fd, name="close")


def close_range(inj: Injection, first: int, last: int, flags: int) -> int:
    return inj.call_nr(abi.NR_CLOSE_RANGE, first, last, flags, name="close_range")


def lseek(inj: Injection, fd: int, offset: int, whence: int) -> int:
    return inj.call_nr(abi.NR_LSEEK, fd, offset, whence, name="lseek")


def openat(inj: Injection, dirfd: int, path: int, flags: int, mode: int) -> int:
    return inj.call_nr(abi.NR_OPENAT, dirfd, path, flags, mode, name="openat")


def openat2(inj: Injection, dirfd: int, path: int, how: int, size: int) -> int:
    return inj.call_nr(abi.NR_OPENAT2, dirfd, path, how, size, name="openat2")


def dup3(inj: Injection, oldfd: int, newfd: int, flags: int) -> int:
    return inj.call_nr(abi.NR_DUP3, oldfd, newfd, flags, name="dup3")


def fcntl(inj: Injection, fd: int, cmd: int, arg: int = 0) -> int:
    return inj.call_nr(abi.NR_FCNTL, fd, cmd, arg, name="fcntl")


def flock(inj: Injection, fd: int, operation: int) -> int:
    return inj.call_nr(abi.NR_FLOCK, fd, operation, name="flock")


def ioctl(inj: Injection, fd: int, request: int, arg: int) -> int:
    return inj.call_nr(abi.NR_IOCTL, fd, request, arg, name="ioctl")


def ftruncate(inj: Injection, fd: int, length: int) -> int:
    return inj.call_nr(abi.NR_FTRUNCATE, fd, length, name="ftruncate")


def fchmod(inj: Injection, fd: int, mode: int) -> int:
    return inj.call_nr(abi.NR_FCHMOD, fd, mode, name="fchmod")


def unlink(inj: Injection, path: int) -> int:
    return inj.call_nr(abi.NR_UNLINK, path, name="unlink")


def chdir(inj: Injection, path: int) -> int:
    return inj.call_nr(abi.NR_CHDIR, path, name="chdir")


def fchdir(inj: Injection, fd: int) -> int:
    return inj.call_nr(abi.NR_FCHDIR, fd, name="fchdir")


def chroot(inj: Injection, path: int) -> int:
    return inj.call_nr(abi.NR_CHROOT, path, name="chroot")


def umask(inj: Injection, mask: int) -> int:
    return inj.call_nr(abi.NR_UMASK, mask, name="umask")


def pipe2(inj: Injection, fds: int, flags: int) -> int:
    return inj.call_nr(abi.NR_PIPE2, fds, flags, name="pipe2")


def eventfd2(inj: Injection, initval: int, flags: int) -> int:
    return inj.call_nr(abi.NR_EVENTFD2, initval, flags, name="eventfd2")


def signalfd4(inj: Injection, fd: int, mask: int, sizemask: int, flags: int) -> int:
    return inj.call_nr(abi.NR_SIGNALFD4, fd, mask, sizemask, flags, name="signalfd4")


def timerfd_create(inj: Injection, clockid: int, flags: int) -> int:
    return inj.call_nr(abi.NR_TIMERFD_CREATE, clockid, flags, name="timerfd_create")


def timerfd_settime(inj: Injection, fd: int, flags: int, new: int, old: int) -> int:
    return inj.call_nr(abi.NR_TIMERFD_SETTIME, fd, flags, new, old, name="timerfd_settime")


def inotify_init1(inj: Injection, flags: int) -> int:
    return inj.call_nr(abi.NR_INOTIFY_INIT1, flags, name="inotify_init1")


def epoll_create1(inj: Injection, flags: int) -> int:
    return inj.call_nr(abi.NR_EPOLL_CREATE1, flags, name="epoll_create1")


def epoll_ctl(inj: Injection, epfd: int, op: int, fd: int, event: int) -> int:
    return inj.call_nr(abi.NR_EPOLL_CTL, epfd, op, fd, event, name="epoll_ctl")


def memfd_create(inj: Injection, name: int, flags: int) -> int:
    return inj.call_nr(abi.NR_MEMFD_CREATE, name, flags, name="memfd_create")


def userfaultfd(inj: Injection, flags: int) -> int:
    return inj.call_nr(abi.NR_USERFAULTFD, flags, name="userfaultfd")


def pidfd_open(inj: Injection, pid: int, flags: int) -> int:
    return inj.call_nr(abi.NR_PIDFD_OPEN, pid, flags, name="pidfd_open")


def pidfd_getfd(inj: Injection, pidfd: int, targetfd: int, flags: int) -> int:
    return inj.call_nr(abi.NR_PIDFD_GETFD, pidfd, targetfd, flags, name="pidfd_getfd")


# -- sockets ---------------------------------------------------------------------------------


def socket(inj: Injection, domain: int, type_: int, protocol: int) -> int:
    return inj.call_nr(abi.NR_SOCKET, domain, type_, protocol, name="socket")


def socketpair(inj: Injection, domain: int, type_: int, protocol: int, sv: int) -> int:
    return inj.call_nr(abi.NR_SOCKETPAIR, domain, type_, protocol, sv, name="socketpair")


def bind(inj: Injection, fd: int, addr: int, addrlen: int) -> int:
    return inj.call_nr(abi.NR_BIND, fd, addr, addrlen, name="bind")


def connect(inj: Injection, fd: int, addr: int, addrlen: int) -> int:
    return inj.call_nr(abi.NR_CONNECT, fd, addr, addrlen, name="connect")


def listen(inj: Injection, fd: int, backlog: int) -> int:
    return inj.call_nr(abi.NR_LISTEN, fd, backlog, name="listen")


def accept4(inj: Injection, fd: int, addr: int, addrlen: int, flags: int) -> int:
    return inj.call_nr(abi.NR_ACCEPT4, fd, addr, addrlen, flags, name="accept4")


# -- memory ----------------------------------------------------------------------------------


def mmap(
    inj: Injection, addr: int, length: int, prot: int, flags: int, fd: int, offset: int
) -> int:
    return inj.call_nr(abi.NR_MMAP, addr, length, prot, flags, fd, offset, name="mmap")


def munmap(inj: Injection, addr: int, length: int) -> int:
    return inj.call_nr(abi.NR_MUNMAP, addr, length, name="munmap")


def mprotect(inj: Injection, addr: int, length: int, prot: int) -> int:
    return inj.call_nr(abi.NR_MPROTECT, addr, length, prot, name="mprotect")


def mremap(inj: Injection, old: int, old_size: int, new_size: int, flags: int, new: int) -> int:
    return inj.call_nr(abi.NR_MREMAP, old, old_size, new_size, flags, new, name="mremap")


def madvise(inj: Injection, addr: int, length: int, advice: int) -> int:
    return inj.call_nr(abi.NR_MADVISE, addr, length, advice, name="madvise")


def mlock2(inj: Injection, addr: int, length: int, flags: int) -> int:
    return inj.call_nr(abi.NR_MLOCK2, addr, length, flags, name="mlock2")


def mseal(inj: Injection, addr: int, length: int, flags: int) -> int:
    return inj.call_nr(abi.NR_MSEAL, addr, length, flags, name="mseal")


def brk(inj: Injection, addr: int) -> int:
    return inj.call_nr(abi.NR_BRK, addr, name="brk")


def shmat(inj: Injection, shmid: int, addr: int, flags: int) -> int:
    return inj.call_nr(abi.NR_SHMAT, shmid, addr, flags, name="shmat")


def get_mempolicy(
    inj: Injection, mode: int, nodemask: int, maxnode: int, addr: int, flags: int
) -> int:
    return inj.call_nr(
        abi.NR_GET_MEMPOLICY, mode, nodemask, maxnode, addr, flags, name="get_mempolicy"
    )


def set_mempolicy(inj: Injection, mode: int, nodemask: int, maxnode: int) -> int:
    return inj.call_nr(abi.NR_SET_MEMPOLICY, mode, nodemask, maxnode, name="set_mempolicy")


def membarrier(inj: Injection, cmd: int, flags: int, cpu_id: int) -> int:
    return inj.call_nr(abi.NR_MEMBARRIER, cmd, flags, cpu_id, name="membarrier")


# -- processes and threads -------------------------------------------------------------------


def prctl(
    inj: Injection, option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0
) -> int:
    return inj.call_nr(abi.NR_PRCTL, option, arg2, arg3, arg4, arg5, name="prctl")


def arch_prctl(inj: Injection, code: int, addr: int) -> int:
    return inj.call_nr(abi.NR_ARCH_PRCTL, code, addr, name="arch_prctl")


def personality(inj: Injection, persona: int) -> int:
    return inj.call_nr(abi.NR_PERSONALITY, persona, name="personality")


def clone3(inj: Injection, args: int, size: int) -> int:
    return inj.call_nr(abi.NR_CLONE3, args, size, name="clone3")


def setsid(inj: Injection) -> int:
    return inj.call_nr(abi.NR_SETSID, name="setsid")


def setpgid(inj: Injection, pid: int, pgid: int) -> int:
    return inj.call_nr(abi.NR_SETPGID, pid, pgid, name="setpgid")


def prlimit64(inj: Injection, pid: int, resource: int, new: int, old: int) -> int:
    return inj.call_nr(abi.NR_PRLIMIT64, pid, resource, new, old, name="prlimit64")


def waitid(inj: Injection, idtype: int, id_: int, infop: int, options: int, rusage: int) -> int:
    return inj.call_nr(abi.NR_WAITID, idtype, id_, infop, options, rusage, name="waitid")


def set_tid_address(inj: Injection, tidptr: int) -> int:
    return inj.call_nr(abi.NR_SET_TID_ADDRESS, tidptr, name="set_tid_address")


def set_robust_list(inj: Injection, head: int, length: int) -> int:
    return inj.call_nr(abi.NR_SET_ROBUST_LIST, head, length, name="set_robust_list")


def rseq(inj: Injection, rseq_addr: int, length: int, flags: int, sig: int) -> int:
    return inj.call_nr(abi.NR_RSEQ, rseq_addr, length, flags, sig, name="rseq")


# -- signals and timers ----------------------------------------------------------------------


def rt_sigaction(inj: Injection, sig: int, act: int, oldact: int, sigsetsize: int) -> int:
    return inj.call_nr(abi.NR_RT_SIGACTION, sig, act, oldact, sigsetsize, name="rt_sigaction")


def rt_sigtimedwait(inj: Injection, set_: int, info: int, timeout: int, sigsetsize: int) -> int:
    return inj.call_nr(
        abi.NR_RT_SIGTIMEDWAIT, set_, info, timeout, sigsetsize, name="rt_sigtimedwait"
    )


def rt_sigqueueinfo(inj: Injection, tgid: int, sig: int, info: int) -> int:
    return inj.call_nr(abi.NR_RT_SIGQUEUEINFO, tgid, sig, info, name="rt_sigqueueinfo")


def rt_tgsigqueueinfo(inj: Injection, tgid: int, tid: int, sig: int, info: int) -> int:
    return inj.call_nr(abi.NR_RT_TGSIGQUEUEINFO, tgid, tid, sig, info, name="rt_tgsigqueueinfo")


def sigaltstack(inj: Injection, ss: int, old_ss: int) -> int:
    return inj.call_nr(abi.NR_SIGALTSTACK, ss, old_ss, name="sigaltstack")


def getitimer(inj: Injection, which: int, value: int) -> int:
    return inj.call_nr(abi.NR_GETITIMER, which, value, name="getitimer")


def setitimer(inj: Injection, which: int, new: int, old: int) -> int:
    return inj.call_nr(abi.NR_SETITIMER, which, new, old, name="setitimer")


def timer_create(inj: Injection, clockid: int, sevp: int, timerid: int) -> int:
    return inj.call_nr(abi.NR_TIMER_CREATE, clockid, sevp, timerid, name="timer_create")


def timer_settime(inj: Injection, timerid: int, flags: int, new: int, old: int) -> int:
    return inj.call_nr(abi.NR_TIMER_SETTIME, timerid, flags, new, old, name="timer_settime")


def timer_gettime(inj: Injection, timerid: int, value: int) -> int:
    return inj.call_nr(abi.NR_TIMER_GETTIME, timerid, value, name="timer_gettime")


# -- credentials -----------------------------------------------------------------------------


def setresuid(inj: Injection, ruid: int, euid: int, suid: int) -> int:
    return inj.call_nr(abi.NR_SETRESUID, ruid, euid, suid, name="setresuid")


def setresgid(inj: Injection, rgid: int, egid: int, sgid: int) -> int:
    return inj.call_nr(abi.NR_SETRESGID, rgid, egid, sgid, name="setresgid")


def setgroups(inj: Injection, size: int, groups: int) -> int:
    return inj.call_nr(abi.NR_SETGROUPS, size, groups, name="setgroups")


def setfsuid(inj: Injection, fsuid: int) -> int:
    """The previous fsuid: setfsuid never fails (an id it refuses changes nothing, and
    -1 reads the current one), so its result is never an errno."""
    return inj.raw(abi.NR_SETFSUID, fsuid)


def setfsgid(inj: Injection, fsgid: int) -> int:
    """The previous fsgid (see setfsuid)."""
    return inj.raw(abi.NR_SETFSGID, fsgid)


def capset(inj: Injection, header: int, data: int) -> int:
    return inj.call_nr(abi.NR_CAPSET, header, data, name="capset")


def seccomp(inj: Injection, operation: int, flags: int, args: int) -> int:
    return inj.call_nr(abi.NR_SECCOMP, operation, flags, args, name="seccomp")
