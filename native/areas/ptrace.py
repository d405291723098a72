"""ptrace: register access, regsets and syscall injection.

Injection runs from a `syscall` instruction the caller chose and is driven by
PTRACE_SYSCALL stops (never int3): with PTRACE_O_TRACESYSGOOD, a tracer that
dies while the tracee sits in a syscall stop leaves no SIGTRAP behind, so the
tracee simply executes the code that follows the instruction (ckpt's heal
trampoline, see ckpt/kernel/remote.py).
"""

INCLUDES = """
#include <signal.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <sys/uio.h>
#include <cpuid.h>
#include <sched.h>
#include <stdlib.h>
"""

TYPES = """
struct ck_thread_state {
    int regs_err, xstate_err, mask_err, rseq_err, robust_err, pending_err;
    long xstate_len;
    uint64_t mask;
    uint64_t rseq[3];           /* ptr, size | signature << 32, flags */
    uint64_t robust[2];         /* head, len */
    int npending;               /* -1: 32 or more: read them again one by one */
};
struct user_regs_struct {
    unsigned long r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8;
    unsigned long rax, rcx, rdx, rsi, rdi, orig_rax, rip, cs, eflags, rsp, ss;
    unsigned long fs_base, gs_base, ds, es, fs, gs;
};
"""

FUNCTIONS = """
long ck_ptrace(long request, int pid, uintptr_t addr, uintptr_t data);
int ck_getregs(int pid, struct user_regs_struct *regs);
int ck_setregs(int pid, const struct user_regs_struct *regs);
long ck_getregset(int pid, int nt, void *buf, size_t len);
int ck_setregset(int pid, int nt, void *buf, size_t len);
int ck_xstate_size(void);
int ck_wait(int pid, int *status, int options);
int ck_inject_syscall(int pid, const struct user_regs_struct *base, uint64_t insn, long nr,
                      const long *args, long *result, int *last_status);
int ck_inject_many(int n, const int *tids, const struct user_regs_struct *base,
                   const uint64_t *insn, int k, const long *nrs, const long *args,
                   long *results, int *states, int *statuses);
int ck_run_programs(int n, const int *tids, const struct user_regs_struct *regs,
                    const uint64_t *masks, const int *markers, const uint64_t *ends,
                    int pass_foreign, int *states, int *statuses);
int ck_leave_many(int n, const int *tids, const int *park, const uint64_t *masks,
                  const struct user_regs_struct *regs, const char *xstate, size_t xsize,
                  int *states, int *statuses);
int ck_seize_many(int n, const int *tids, long opts, int *states, int *stops,
                  int *attached);
void ck_thread_states(int n, const int *tids, struct user_regs_struct *regs, char *xstate,
                      size_t xsize, char *pending, struct ck_thread_state *out);
"""

CUSTOMIZATIONS = """
long ck_ptrace(long request, int pid, uintptr_t addr, uintptr_t data)
{
    errno = 0;
    long r = ptrace((enum __ptrace_request)request, pid, (void *)addr, (void *)data);
    if (r == -1 && errno) return -errno;
    return r;
}

int ck_getregs(int pid, struct user_regs_struct *regs)
{
    return ptrace(PTRACE_GETREGS, pid, 0, regs) < 0 ? -errno : 0;
}

int ck_setregs(int pid, const struct user_regs_struct *regs)
{
    return ptrace(PTRACE_SETREGS, pid, 0, regs) < 0 ? -errno : 0;
}

long ck_getregset(int pid, int nt, void *buf, size_t len)
{
    struct iovec iov = { buf, len };
    if (ptrace(PTRACE_GETREGSET, pid, (void *)(long)nt, &iov) < 0) return -errno;
    return (long)iov.iov_len;
}

int ck_setregset(int pid, int nt, void *buf, size_t len)
{
    struct iovec iov = { buf, len };
    return ptrace(PTRACE_SETREGSET, pid, (void *)(long)nt, &iov) < 0 ? -errno : 0;
}

/* Size of the standard-format XSAVE area for the features the OS enabled. */
int ck_xstate_size(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid_count(0xd, 0, &a, &b, &c, &d)) return 512;
    return b < 512 ? 512 : (int)b;
}

int ck_wait(int pid, int *status, int options)
{
    int r;
    do { r = waitpid(pid, status, options | __WALL); } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : r;
}

/* Run one syscall in a stopped tracee. Returns 0 and the result, or -errno of
   the ptrace machinery; -ECHILD when the tracee died, -EFAULT when it took a
   signal instead of finishing the syscall (status in *last_status). */
int ck_inject_syscall(int pid, const struct user_regs_struct *base, uint64_t insn, long nr,
                      const long *args, long *result, int *last_status)
{
    struct user_regs_struct r = *base;
    int phase = 0, st = 0;
    r.rip = insn;
    r.rax = nr;
    r.orig_rax = -1;
    r.rdi = args[0]; r.rsi = args[1]; r.rdx = args[2];
    r.r10 = args[3]; r.r8 = args[4]; r.r9 = args[5];
    r.eflags &= ~(0x100UL | 0x400UL);          /* TF, DF */
    if (ptrace(PTRACE_SETREGS, pid, 0, &r) < 0) return -errno;
    for (;;) {
        if (ptrace(PTRACE_SYSCALL, pid, 0, 0) < 0) return -errno;
        int w;
        do { w = waitpid(pid, &st, __WALL); } while (w < 0 && errno == EINTR);
        if (w < 0) return -errno;
        *last_status = st;
        if (WIFEXITED(st) || WIFSIGNALED(st)) return -ECHILD;
        if (!WIFSTOPPED(st)) continue;
        int sig = WSTOPSIG(st);
        if (sig == (SIGTRAP | 0x80)) {
            if (phase == 0) { phase = 1; continue; }
            if (ptrace(PTRACE_GETREGS, pid, 0, &r) < 0) return -errno;
            *result = (long)r.rax;
            return 0;
        }
        if ((st >> 16) == PTRACE_EVENT_STOP) continue;   /* interrupt / group stop: go on */
        if ((st >> 16) == PTRACE_EVENT_CLONE || (st >> 16) == PTRACE_EVENT_FORK)
            continue;                   /* an injected clone3: the child is auto-attached */
        return -EFAULT;                                   /* a real signal: a fault */
    }
}

/* k syscalls in each of n stopped tracees, every thread at once: like k calls of
   ck_inject_syscall per thread (thread i runs nrs[i*k+j] with args[(i*k+j)*6..] from
   insn[i], base registers base[i], one syscall at a time, by PTRACE_SYSCALL stops),
   but the stops of all threads are served as they come, so that the threads' round
   trips overlap instead of adding up. results[i*k+j]; states[i]: 0 when its k calls
   ran, else -errno of the ptrace machinery, -ECHILD (it died) or -EFAULT (it took a
   signal: statuses[i]; it is left at that stop). Returns 0, or -errno of waitpid. */
struct ck_many { int tid, call, phase, active; };

static int ck_many_start(struct ck_many *t, int i, const struct user_regs_struct *base,
                         const uint64_t *insn, int k, const long *nrs, const long *args)
{
    struct user_regs_struct r = base[i];
    const long *a = args + ((size_t)i * k + t->call) * 6;
    r.rip = insn[i];
    r.rax = nrs[(size_t)i * k + t->call];
    r.orig_rax = -1;
    r.rdi = a[0]; r.rsi = a[1]; r.rdx = a[2];
    r.r10 = a[3]; r.r8 = a[4]; r.r9 = a[5];
    r.eflags &= ~(0x100UL | 0x400UL);          /* TF, DF */
    if (ptrace(PTRACE_SETREGS, t->tid, 0, &r) < 0) return -errno;
    if (ptrace(PTRACE_SYSCALL, t->tid, 0, 0) < 0) return -errno;
    t->phase = 0;
    return 0;
}

int ck_inject_many(int n, const int *tids, const struct user_regs_struct *base,
                   const uint64_t *insn, int k, const long *nrs, const long *args,
                   long *results, int *states, int *statuses)
{
    struct ck_many *t = calloc((size_t)n, sizeof(*t));
    if (!t) return -ENOMEM;
    int active = 0;
    for (int i = 0; i < n; i++) {
        t[i].tid = tids[i];
        states[i] = 0;
        if (k <= 0) continue;
        int r = ck_many_start(&t[i], i, base, insn, k, nrs, args);
        if (r) { states[i] = r; continue; }
        t[i].active = 1;
        active++;
    }
    int ret = 0;
    /* Round robin, each thread's stop waited for in turn: while ckpt serves one, the
       others run to their next stop, so by its turn a thread has usually stopped
       already. (waitid(P_ALL) would scan every tracee of ckpt's for each stop.) */
    for (int i = 0; active; i = (i + 1) % n) {
        if (!t[i].active) continue;
        int st = 0, w;
        do { w = waitpid(t[i].tid, &st, __WALL); } while (w < 0 && errno == EINTR);
        if (w < 0) { ret = -errno; break; }
        struct ck_many *c = &t[i];
        int r = 0;
        if (WIFEXITED(st) || WIFSIGNALED(st)) {
            statuses[i] = st;
            r = -ECHILD;
        } else if (WIFSTOPPED(st)) {
            int sig = WSTOPSIG(st), ev = st >> 16;
            if (sig == (SIGTRAP | 0x80)) {
                if (c->phase == 0) {
                    c->phase = 1;
                    r = ptrace(PTRACE_SYSCALL, c->tid, 0, 0) < 0 ? -errno : 0;
                } else {
                    struct user_regs_struct g;
                    if (ptrace(PTRACE_GETREGS, c->tid, 0, &g) < 0) {
                        r = -errno;
                    } else {
                        results[(size_t)i * k + c->call] = (long)g.rax;
                        if (++c->call == k) { c->active = 0; active--; continue; }
                        r = ck_many_start(c, i, base, insn, k, nrs, args);
                    }
                }
            } else if (ev == PTRACE_EVENT_STOP || ev == PTRACE_EVENT_CLONE ||
                       ev == PTRACE_EVENT_FORK) {
                r = ptrace(PTRACE_SYSCALL, c->tid, 0, 0) < 0 ? -errno : 0;
            } else {
                statuses[i] = st;
                r = -EFAULT;                    /* a real signal: a fault */
            }
        }
        if (r) {
            states[i] = r;
            c->active = 0;
            active--;
        }
    }
    free(t);
    return ret;
}

/* Each of n stopped tracees runs an injected program (kernel/program.py) from the
   registers regs[i] (rip at the program, its table in rbx/r12/r13) under PTRACE_CONT,
   all at once: no stop per syscall, only the one its program ends with, a tgkill of
   markers[i] to itself whose signal-delivery stop has rip == ends[i]. masks: when not
   NULL, each thread's signal mask is set after its registers, before it goes (a dump's
   heal-safe order: kernel/inject_batch.py). On the way:
   event stops (an interrupt, the PTRACE_EVENT_CLONE of an injected clone3) go on; a
   stop for the marker signal elsewhere is a real one, passed on when pass_foreign
   (the dump's markers are signals the process ignores), else a fault like any other
   signal (states[i] -EFAULT, statuses[i] the status; left at that stop). states[i]:
   0 = stopped at its end, -ECHILD = it died, else -errno of ptrace. Returns 0, or
   -errno of waitpid. */
int ck_run_programs(int n, const int *tids, const struct user_regs_struct *regs,
                    const uint64_t *masks, const int *markers, const uint64_t *ends,
                    int pass_foreign, int *states, int *statuses)
{
    char *active = calloc((size_t)n + 1, 1);
    if (!active) return -ENOMEM;
    int left = 0;
    for (int i = 0; i < n; i++) {
        struct user_regs_struct r = regs[i];
        r.eflags &= ~(0x100UL | 0x400UL);          /* TF, DF */
        states[i] = 0;
        statuses[i] = 0;
        uint64_t m = masks ? masks[i] : 0;
        if (ptrace(PTRACE_SETREGS, tids[i], 0, &r) < 0 ||
            (masks && ptrace(PTRACE_SETSIGMASK, tids[i], (void *)8, &m) < 0) ||
            ptrace(PTRACE_CONT, tids[i], 0, 0) < 0) {
            states[i] = -errno;
            continue;
        }
        active[i] = 1;
        left++;
    }
    int ret = 0;
    for (int i = 0; left; i = (i + 1) % n) {
        if (!active[i]) continue;
        int st = 0, w, r = 0, done = 0;
        do { w = waitpid(tids[i], &st, __WALL); } while (w < 0 && errno == EINTR);
        if (w < 0) { ret = -errno; break; }
        if (WIFEXITED(st) || WIFSIGNALED(st)) {
            statuses[i] = st;
            r = -ECHILD;
        } else if (WIFSTOPPED(st)) {
            int sig = WSTOPSIG(st), ev = st >> 16;
            if (ev) {
                r = ptrace(PTRACE_CONT, tids[i], 0, 0) < 0 ? -errno : 0;
            } else if (sig == markers[i]) {
                struct user_regs_struct g;
                if (ptrace(PTRACE_GETREGS, tids[i], 0, &g) < 0) r = -errno;
                else if (g.rip == ends[i]) done = 1;
                else if (pass_foreign)
                    r = ptrace(PTRACE_CONT, tids[i], 0, sig) < 0 ? -errno : 0;
                else { statuses[i] = st; r = -EFAULT; }
            } else {
                statuses[i] = st;
                r = -EFAULT;                    /* a real signal: a fault */
            }
        }
        if (r || done) {
            states[i] = r;
            active[i] = 0;
            left--;
        }
    }
    free(active);
    return ret;
}

/* Each of n stopped tracees gets its signal mask masks[i], its xstate (xstate +
   i * xsize, when xstate is not NULL) and its registers regs[i], in that order (a
   dump's heal code puts back the mask and registers, so the mask goes first), from a
   stop inside get_signal(): where park[i], it is moved there first (PTRACE_INTERRUPT,
   PTRACE_CONT: a PTRACE_EVENT_STOP; ptrace.Tracee.stop_in_signal_path), every thread
   at once. states[i]: 0, -ECHILD (it died), -EFAULT (a signal came first: statuses[i];
   left there), else -errno of ptrace. Returns 0, or -errno of waitpid. */
int ck_leave_many(int n, const int *tids, const int *park, const uint64_t *masks,
                  const struct user_regs_struct *regs, const char *xstate, size_t xsize,
                  int *states, int *statuses)
{
    for (int i = 0; i < n; i++) {
        states[i] = 0;
        statuses[i] = 0;
        if (park[i] && (ptrace(PTRACE_INTERRUPT, tids[i], 0, 0) < 0 ||
                        ptrace(PTRACE_CONT, tids[i], 0, 0) < 0))
            states[i] = -errno;
    }
    for (int i = 0; i < n; i++) {
        if (states[i]) continue;
        while (park[i]) {
            int st = 0, w;
            do { w = waitpid(tids[i], &st, __WALL); } while (w < 0 && errno == EINTR);
            if (w < 0) return -errno;
            if (WIFEXITED(st) || WIFSIGNALED(st)) { statuses[i] = st; states[i] = -ECHILD; }
            else if (WIFSTOPPED(st) && (st >> 16) == PTRACE_EVENT_STOP) break;
            else if (WIFSTOPPED(st)) { statuses[i] = st; states[i] = -EFAULT; }
            else continue;
            break;
        }
        if (states[i]) continue;
        uint64_t m = masks[i];
        if (ptrace(PTRACE_SETSIGMASK, tids[i], (void *)8, &m) < 0) { states[i] = -errno; continue; }
        if (xstate) {
            struct iovec iov = { (void *)(xstate + (size_t)i * xsize), xsize };
            if (ptrace(PTRACE_SETREGSET, tids[i], (void *)(long)0x202, &iov) < 0) {
                states[i] = -errno;
                continue;
            }
        }
        if (ptrace(PTRACE_SETREGS, tids[i], 0, &regs[i]) < 0) states[i] = -errno;
    }
    return 0;
}

/* PTRACE_SEIZE (options opts) and PTRACE_INTERRUPT each of n tasks, then wait for
   each one's PTRACE_EVENT_STOP, passing on any signal-delivery stop seen first (the
   signal is delivered, not lost; ptrace.Tracee.interrupt), all at once. attached[i]:
   whether it is traced by us now. states[i]: 0 (stopped: stops[i] is the stop's
   signal, SIGSTOP etc. in a group stop), -ECHILD (it exited while being stopped), else
   -errno of the ptrace call that failed (PTRACE_SEIZE when not attached). Returns 0,
   or -errno of waitpid. */
int ck_seize_many(int n, const int *tids, long opts, int *states, int *stops, int *attached)
{
    for (int i = 0; i < n; i++) {
        stops[i] = 0;
        attached[i] = ptrace(PTRACE_SEIZE, tids[i], 0, (void *)opts) == 0;
        states[i] = attached[i] ? 0 : -errno;
        if (attached[i] && ptrace(PTRACE_INTERRUPT, tids[i], 0, 0) < 0) states[i] = -errno;
    }
    for (int i = 0; i < n; i++) {
        if (states[i]) continue;
        for (;;) {
            int st = 0, w;
            do { w = waitpid(tids[i], &st, __WALL); } while (w < 0 && errno == EINTR);
            if (w < 0) return -errno;
            if (WIFEXITED(st) || WIFSIGNALED(st)) {
                states[i] = -ECHILD;
                attached[i] = 0;
                break;
            }
            if (!WIFSTOPPED(st)) continue;
            if ((st >> 16) == PTRACE_EVENT_STOP) { stops[i] = WSTOPSIG(st); break; }
            if (ptrace(PTRACE_CONT, tids[i], 0, WSTOPSIG(st)) < 0) { states[i] = -errno; break; }
        }
    }
    return 0;
}

struct ck_thread_state {
    int regs_err, xstate_err, mask_err, rseq_err, robust_err, pending_err;
    long xstate_len;
    uint64_t mask;
    uint64_t rseq[3];           /* ptr, size | signature << 32, flags */
    uint64_t robust[2];         /* head, len */
    int npending;               /* -1: 32 or more: read them again one by one */
};

/* What ptrace shows of each of n stopped threads (capture/process.py, one call for all
   of them instead of six per thread): registers, xstate (xsize bytes each at xstate +
   i * xsize), signal mask, rseq configuration, robust list, and up to 31 private
   pending siginfos (128 bytes each at pending + i * 32 * 128). Each *_err is 0 or the
   -errno of its call. */
void ck_thread_states(int n, const int *tids, struct user_regs_struct *regs, char *xstate,
                      size_t xsize, char *pending, struct ck_thread_state *out)
{
    for (int i = 0; i < n; i++) {
        struct ck_thread_state *o = &out[i];
        int tid = tids[i];
        memset(o, 0, sizeof(*o));
        o->regs_err = ptrace(PTRACE_GETREGS, tid, 0, &regs[i]) < 0 ? -errno : 0;
        struct iovec iov = { xstate + (size_t)i * xsize, xsize };
        if (ptrace(PTRACE_GETREGSET, tid, (void *)(long)0x202, &iov) < 0) o->xstate_err = -errno;
        else o->xstate_len = (long)iov.iov_len;
        if (ptrace(PTRACE_GETSIGMASK, tid, (void *)8, &o->mask) < 0) o->mask_err = -errno;
        unsigned char rs[24];
        memset(rs, 0, sizeof(rs));
        if (ptrace(0x420f /* PTRACE_GET_RSEQ_CONFIGURATION */, tid, (void *)24, rs) < 0) {
            o->rseq_err = -errno;
        } else {
            memcpy(&o->rseq[0], rs, 8);
            memcpy(&o->rseq[1], rs + 8, 8);
            memcpy(&o->rseq[2], rs + 16, 8);
        }
        long r = syscall(SYS_get_robust_list, tid, &o->robust[0], &o->robust[1]);
        if (r < 0) o->robust_err = -errno;
        struct { uint64_t off; uint32_t flags; int32_t nr; } arg = { 0, 0, 32 };
        long k = ptrace(0x4209 /* PTRACE_PEEKSIGINFO */, tid, &arg,
                        pending + (size_t)i * 32 * 128);
        if (k < 0) o->pending_err = -errno;
        else o->npending = k >= 32 ? -1 : (int)k;
    }
}
"""
