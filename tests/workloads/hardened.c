/* hardened: a sandboxed process that checks its own security context (issue 15).
 *
 * usage: hardened MODE      (started as root)
 *   nobody  four threads (main, t1, t2, t3), all made uid 2001/2002/2003 (fsuid 2004),
 *           gid 1001/1002/1003 (fsgid 1004), groups 100,4242, securebits NOROOT|
 *           NOROOT_LOCKED|NO_SETUID_FIXUP (t3 also KEEP_CAPS, and fsuid 3333 of its own),
 *           capabilities inh {NET_RAW, NET_BIND_SERVICE, SYS_TIME} prm {NET_RAW,
 *           NET_BIND_SERVICE, KILL} eff {NET_BIND_SERVICE, KILL} amb {NET_BIND_SERVICE},
 *           bounding without CHOWN, SYS_TIME, SYS_ADMIN, MKNOD; no_new_privs; a seccomp
 *           filter on getppid (errno 1111) installed by main with TSYNC (one filter all
 *           threads share), and t2 one more of its own on getpgrp (errno 2222)
 *   root    uid 0 with groups 10,20,30, a filter on getppid (installed without
 *           no_new_privs), then CAP_SYS_ADMIN, CAP_NET_ADMIN and CAP_CHOWN dropped from
 *           prm/eff and CAP_MKNOD from the bounding set
 *   chroot  root, then chroot(".") (its working directory, which holds "marker")
 *   strict  root, plus a thread s in seccomp strict mode serving a pipe
 *   tree    root, and a child forked after the filter that adds its own on getpgrp
 *           (with no_new_privs: it has no CAP_SYS_ADMIN left)
 *   strictmain  the main thread in strict mode serving a pipe; a second thread (root
 *           with groups 10,20,30, a filter, capabilities dropped) verifies
 *   noway   root, plus a thread whose filter kills on getpid and on rt_sigreturn:
 *           neither of ckpt's ways back for a thread would pass it (refused)
 *   nosigmask  root, plus a thread whose filter fails rt_sigprocmask (EPERM): ckpt
 *           puts that one back by rt_sigreturn should it die; asked, the thread
 *           checks its signal mask is the one it had
 * Every mode first sets its loginuid to 4242 (the test's own is unset).
 *
 * READY pid= child= t1= t2= t3= s=
 * On SIGUSR2 every thread checks itself: uids and fs ids, gids, groups, capability sets
 * (capget, PR_CAPBSET_READ, PR_CAP_AMBIENT_IS_SET), securebits, no_new_privs, seccomp
 * mode; that its filters deny what they denied and nothing more; that a dropped
 * capability stays dropped (chown of a root-owned file fails with EPERM) and a kept one
 * works (kill(1, 0) needs CAP_KILL); loginuid. nobody: then t2 exits and main
 * installs one more filter with TSYNC, which succeeds only if t1 and t3 still share
 * main's filters. chroot: "/" is still the directory it chrooted to.
 * VERIFY OK pid= mode=   or   VERIFY FAIL pid= reason=
 */
#include "wl.h"

#include <grp.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#define DENY_ALL 1111 /* getppid, every thread */
#define DENY_T2 2222  /* getpgrp, t2 only (nobody) or the child (tree) */
#define LOGINUID 4242

#define BIT(c) (1ULL << (c))
#define SB_NOROOT 0x1
#define SB_NOROOT_LOCKED 0x2
#define SB_NO_SETUID_FIXUP 0x4
#define SB_KEEP_CAPS 0x10

static const char *mode;
static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

/* ---- what each thread must be ------------------------------------------------------ */

struct want {
    unsigned uid[4], gid[4];
    int ngroups;
    gid_t groups[4];
    uint64_t inh, prm, eff, bnd, amb;
    int securebits, nnp, seccomp;
    int deny_pgrp; /* getpgrp fails with DENY_T2 */
};

static struct want w_main, w_t[3];
static uint64_t all_caps; /* the bounding set at the start */

static long cap_get(uint64_t *eff, uint64_t *prm, uint64_t *inh)
{
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct d[2];
    long r = syscall(SYS_capget, &h, d);
    *eff = d[0].effective | (uint64_t)d[1].effective << 32;
    *prm = d[0].permitted | (uint64_t)d[1].permitted << 32;
    *inh = d[0].inheritable | (uint64_t)d[1].inheritable << 32;
    return r;
}

static long cap_set(uint64_t eff, uint64_t prm, uint64_t inh)
{
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct d[2] = {
        {(uint32_t)eff, (uint32_t)prm, (uint32_t)inh},
        {(uint32_t)(eff >> 32), (uint32_t)(prm >> 32), (uint32_t)(inh >> 32)},
    };
    return syscall(SYS_capset, &h, d);
}

static int last_cap(void)
{
    int n = 0;
    while (n < 63 && prctl(PR_CAPBSET_READ, n + 1, 0, 0, 0) >= 0)
        n++;
    return n;
}

/* The calling thread as it is now (for `want`). */
static void snapshot(struct want *w)
{
    syscall(SYS_getresuid, &w->uid[0], &w->uid[1], &w->uid[2]);
    syscall(SYS_getresgid, &w->gid[0], &w->gid[1], &w->gid[2]);
    w->uid[3] = (unsigned)syscall(SYS_setfsuid, -1);
    w->gid[3] = (unsigned)syscall(SYS_setfsgid, -1);
    w->ngroups = (int)syscall(SYS_getgroups, 4, w->groups);
    cap_get(&w->eff, &w->prm, &w->inh);
    w->bnd = w->amb = 0;
    for (int c = 0; c <= last_cap(); c++) {
        if (prctl(PR_CAPBSET_READ, c, 0, 0, 0) == 1)
            w->bnd |= BIT(c);
        if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, c, 0, 0) == 1)
            w->amb |= BIT(c);
    }
    w->securebits = prctl(PR_GET_SECUREBITS, 0, 0, 0, 0);
    w->nnp = prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0);
    w->seccomp = prctl(PR_GET_SECCOMP, 0, 0, 0, 0);
}

/* The calling thread against `w`: every difference is a fail() naming the thread. */
static void check(const char *who, const struct want *w)
{
    struct want n;
    memset(&n, 0, sizeof(n));
    snapshot(&n);
    for (int i = 0; i < 4; i++) {
        CHECK(n.uid[i] == w->uid[i], "%s_uid%d=%u", who, i, n.uid[i]);
        CHECK(n.gid[i] == w->gid[i], "%s_gid%d=%u", who, i, n.gid[i]);
    }
    CHECK(n.ngroups == w->ngroups, "%s_ngroups=%d", who, n.ngroups);
    for (int i = 0; i < n.ngroups && i < w->ngroups; i++)
        CHECK(n.groups[i] == w->groups[i], "%s_group%d=%u", who, i, (unsigned)n.groups[i]);
    CHECK(n.inh == w->inh, "%s_inh=%llx", who, (unsigned long long)n.inh);
    CHECK(n.prm == w->prm, "%s_prm=%llx", who, (unsigned long long)n.prm);
    CHECK(n.eff == w->eff, "%s_eff=%llx", who, (unsigned long long)n.eff);
    CHECK(n.bnd == w->bnd, "%s_bnd=%llx", who, (unsigned long long)n.bnd);
    CHECK(n.amb == w->amb, "%s_amb=%llx", who, (unsigned long long)n.amb);
    CHECK(n.securebits == w->securebits, "%s_securebits=%#x", who, n.securebits);
    CHECK(n.nnp == w->nnp, "%s_nnp=%d", who, n.nnp);
    CHECK(n.seccomp == w->seccomp, "%s_seccomp=%d", who, n.seccomp);
    /* the filters deny what they denied, and nothing more */
    errno = 0;
    long r = syscall(SYS_getppid);
    CHECK(r == -1 && errno == DENY_ALL, "%s_getppid=%ld/%d", who, r, errno);
    errno = 0;
    r = syscall(SYS_getpgrp);
    if (w->deny_pgrp)
        CHECK(r == -1 && errno == DENY_T2, "%s_getpgrp=%ld/%d", who, r, errno);
    else
        CHECK(r > 0, "%s_getpgrp=%ld/%d", who, r, errno);
    /* a dropped capability stays dropped, a kept one works */
    if (!(w->eff & BIT(CAP_CHOWN))) {
        errno = 0;
        r = chown("owned", 5, 5);
        CHECK(r == -1 && errno == EPERM, "%s_chown=%ld/%d", who, r, errno);
    }
    if (w->eff & BIT(CAP_KILL))
        CHECK(kill(1, 0) == 0, "%s_kill1=%d", who, errno);
}

static void expect_drop(struct want *w, uint64_t inh, uint64_t prm, uint64_t eff,
                        uint64_t bnd_drop, uint64_t amb)
{
    w->inh = inh;
    w->prm = prm;
    w->eff = eff;
    w->bnd = all_caps & ~bnd_drop;
    w->amb = amb;
}

/* ---- seccomp ------------------------------------------------------------------------- */

static int install_filter(int nr, int err, unsigned flags)
{
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)nr, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (unsigned)err),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof(f) / sizeof(f[0]), f};
    return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog);
}

static int allow_all_tsync(void)
{
    struct sock_filter f[] = {BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
    struct sock_fprog prog = {1, f};
    return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &prog);
}

/* ---- threads ----------------------------------------------------------------------- */

struct thr {
    int idx; /* 0..2: t1..t3; 3: s (strict) */
    pthread_t th;
    pid_t tid;
    int cmd[2];
};
static struct thr thr[4];
static int reply[2];
static pthread_barrier_t bar;
static int nthreads;

#define NOBODY_CAPS_INH (BIT(CAP_NET_RAW) | BIT(CAP_NET_BIND_SERVICE) | BIT(CAP_SYS_TIME))
#define NOBODY_CAPS_PRM (BIT(CAP_NET_RAW) | BIT(CAP_NET_BIND_SERVICE) | BIT(CAP_KILL))
#define NOBODY_CAPS_EFF (BIT(CAP_NET_BIND_SERVICE) | BIT(CAP_KILL))
#define NOBODY_BND_DROP (BIT(CAP_CHOWN) | BIT(CAP_SYS_TIME) | BIT(CAP_SYS_ADMIN) | BIT(CAP_MKNOD))
#define NOBODY_AMB BIT(CAP_NET_BIND_SERVICE)
#define SB_ALL (SB_NOROOT | SB_NOROOT_LOCKED | SB_NO_SETUID_FIXUP)

static int setup_err;

/* The per-thread part of `nobody`, run by every thread itself (caps, securebits, fs ids
   and no_new_privs belong to the calling thread). Phases are separated by barriers. */
static void harden_self(int idx)
{
    int sb = SB_ALL | (idx == 2 ? SB_KEEP_CAPS : 0);
    if (prctl(PR_SET_SECUREBITS, sb, 0, 0, 0) != 0)
        setup_err = __LINE__;
    pthread_barrier_wait(&bar); /* main: setgroups, setresgid, setresuid */
    pthread_barrier_wait(&bar);
    syscall(SYS_setfsgid, 1004);
    syscall(SYS_setfsuid, idx == 2 ? 3333 : 2004);
    uint64_t e, p, i;
    cap_get(&e, &p, &i);
    if (cap_set(e, p, NOBODY_CAPS_INH) != 0)
        setup_err = __LINE__;
    for (int c = 0; c < 64; c++)
        if (NOBODY_BND_DROP & BIT(c) && prctl(PR_CAPBSET_DROP, c, 0, 0, 0) != 0)
            setup_err = __LINE__;
    if (cap_set(NOBODY_CAPS_EFF, NOBODY_CAPS_PRM, NOBODY_CAPS_INH) != 0)
        setup_err = __LINE__;
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_BIND_SERVICE, 0, 0) != 0)
        setup_err = __LINE__;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        setup_err = __LINE__;
    pthread_barrier_wait(&bar); /* main: the shared filter, with TSYNC */
    pthread_barrier_wait(&bar);
    if (idx == 1 && install_filter(SYS_getpgrp, DENY_T2, 0) != 0)
        setup_err = __LINE__;
    pthread_barrier_wait(&bar);
}

static void *thread_main(void *arg)
{
    struct thr *t = arg;
    t->tid = (pid_t)syscall(SYS_gettid);
    if (strcmp(mode, "nobody") == 0)
        harden_self(t->idx);
    else if (strcmp(mode, "noway") == 0 || strcmp(mode, "nosigmask") == 0) {
        int noway = strcmp(mode, "noway") == 0;
        unsigned deny = noway ? SECCOMP_RET_KILL_THREAD : SECCOMP_RET_ERRNO | EPERM;
        struct sock_filter f[] = {
            BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, noway ? SYS_getpid : SYS_rt_sigprocmask, 0, 1),
            BPF_STMT(BPF_RET | BPF_K, deny),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, noway ? SYS_rt_sigreturn : 0xFFFF, 0, 1),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_THREAD),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        };
        char path[64], *st, mask0[32] = "", mask[32] = "";
        snprintf(path, sizeof(path), "/proc/self/task/%d/status", (int)t->tid);
        if (read_file(path, &st) >= 0 && strstr(st, "SigBlk:"))
            snprintf(mask0, sizeof(mask0), "%.16s", strstr(st, "SigBlk:") + 8);
        struct sock_fprog prog = {sizeof(f) / sizeof(f[0]), f};
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
            syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0)
            setup_err = __LINE__;
        syscall(SYS_write, reply[1], "r", 1);
        for (;;) { /* nosigmask: 'f' if still filtered and its mask is the one it had */
            char c;
            if (read(t->cmd[0], &c, 1) == 1) {
                sigset_t set;
                long r = syscall(SYS_rt_sigprocmask, SIG_BLOCK, NULL, &set, 8);
                int filtered = r == -1 && errno == EPERM;
                mask[0] = 0;
                if (read_file(path, &st) >= 0 && strstr(st, "SigBlk:"))
                    snprintf(mask, sizeof(mask), "%.16s", strstr(st, "SigBlk:") + 8);
                char a = !filtered ? 'x' : strcmp(mask, mask0) != 0 ? 'm' : 'f';
                if (write(reply[1], &a, 1) != 1)
                    setup_err = __LINE__;
            }
        }
    } else if (t->idx == 3) { /* strict: serve the pipe with read/write only */
        if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT, 0, 0, 0) != 0)
            setup_err = __LINE__;
        syscall(SYS_write, reply[1], "r", 1);
        for (;;) {
            char c;
            long r = syscall(SYS_read, t->cmd[0], &c, 1);
            if (r == 1 && c == 'q')
                syscall(SYS_exit, 0);
            if (r == 1)
                syscall(SYS_write, reply[1], "s", 1);
        }
    }
    for (;;) {
        char c;
        ssize_t r = read(t->cmd[0], &c, 1);
        if (r == 1 && c == 'q')
            return NULL;
        if (r == 1) {
            char who[8];
            snprintf(who, sizeof(who), "t%d", t->idx + 1);
            check(who, &w_t[t->idx]);
            if (write(reply[1], "k", 1) != 1)
                fail("%s_reply", who);
        }
    }
}

static void start_threads(int n, int first)
{
    SETUP_CHECK(pipe(reply) == 0, "pipe");
    nthreads = n;
    SETUP_CHECK(pthread_barrier_init(&bar, NULL, (unsigned)n + 1) == 0, "barrier");
    for (int i = 0; i < n; i++) {
        struct thr *t = &thr[first + i];
        t->idx = first + i;
        SETUP_CHECK(pipe(t->cmd) == 0, "pipe");
        SETUP_CHECK(pthread_create(&t->th, NULL, thread_main, t) == 0, "pthread_create");
    }
}

/* Ask thread t to check itself (or, strict, to answer), wait for its reply (a thread
   that died never answers: give up after 20 s). */
static void ask(struct thr *t, char c)
{
    if (write(t->cmd[1], &c, 1) != 1) {
        fail("ask_t%d", t->idx + 1);
        return;
    }
    if (c == 'q')
        return;
    struct pollfd p = {reply[0], POLLIN, 0};
    char r;
    if (poll(&p, 1, 20000) != 1 || read(reply[0], &r, 1) != 1)
        fail("no_reply_t%d", t->idx + 1);
}

/* ---- modes --------------------------------------------------------------------------- */

static void set_loginuid(void)
{
    int fd = open("/proc/self/loginuid", O_WRONLY);
    SETUP_CHECK(fd >= 0, "open loginuid");
    SETUP_CHECK(write(fd, "4242", 4) == 4, "write loginuid");
    close(fd);
}

static void setup_nobody(void)
{
    start_threads(3, 0);
    int sb = SB_ALL;
    SETUP_CHECK(prctl(PR_SET_SECUREBITS, sb, 0, 0, 0) == 0, "securebits");
    pthread_barrier_wait(&bar);
    gid_t groups[2] = {100, 4242};
    SETUP_CHECK(setgroups(2, groups) == 0, "setgroups"); /* glibc: every thread */
    SETUP_CHECK(setresgid(1001, 1002, 1003) == 0, "setresgid");
    SETUP_CHECK(setresuid(2001, 2002, 2003) == 0, "setresuid");
    pthread_barrier_wait(&bar);
    syscall(SYS_setfsgid, 1004);
    syscall(SYS_setfsuid, 2004);
    uint64_t e, p, i;
    cap_get(&e, &p, &i);
    SETUP_CHECK(cap_set(e, p, NOBODY_CAPS_INH) == 0, "capset inh");
    for (int c = 0; c < 64; c++)
        if (NOBODY_BND_DROP & BIT(c))
            SETUP_CHECK(prctl(PR_CAPBSET_DROP, c, 0, 0, 0) == 0, "bounding");
    SETUP_CHECK(cap_set(NOBODY_CAPS_EFF, NOBODY_CAPS_PRM, NOBODY_CAPS_INH) == 0, "capset");
    SETUP_CHECK(prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_BIND_SERVICE, 0, 0) == 0,
                "ambient");
    SETUP_CHECK(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0, "nnp");
    pthread_barrier_wait(&bar);
    SETUP_CHECK(install_filter(SYS_getppid, DENY_ALL, SECCOMP_FILTER_FLAG_TSYNC) == 0, "tsync");
    pthread_barrier_wait(&bar);
    pthread_barrier_wait(&bar);
    errno = 0;
    SETUP_CHECK(setup_err == 0, "thread setup");

    struct want base = {
        .uid = {2001, 2002, 2003, 2004}, .gid = {1001, 1002, 1003, 1004},
        .ngroups = 2, .groups = {100, 4242}, .securebits = SB_ALL, .nnp = 1, .seccomp = 2,
    };
    expect_drop(&base, NOBODY_CAPS_INH, NOBODY_CAPS_PRM, NOBODY_CAPS_EFF, NOBODY_BND_DROP,
                NOBODY_AMB);
    w_main = base;
    for (int k = 0; k < 3; k++)
        w_t[k] = base;
    w_t[1].deny_pgrp = 1;
    w_t[2].uid[3] = 3333;
    w_t[2].securebits |= SB_KEEP_CAPS;
}

/* root, chroot, strict, tree, noway: uid 0 with groups, a filter, some capabilities dropped.
   strict: the thread in strict mode is started after setgroups (glibc runs it in every
   thread: strict mode would kill that one) and before the filter (a thread under a
   filter cannot enter strict mode). */
static void setup_root(int strict)
{
    gid_t groups[3] = {10, 20, 30};
    SETUP_CHECK(setgroups(3, groups) == 0, "setgroups");
    if (strict) {
        start_threads(1, 3);
        char c;
        SETUP_CHECK(read(reply[0], &c, 1) == 1 && setup_err == 0, "strict thread");
    }
    SETUP_CHECK(install_filter(SYS_getppid, DENY_ALL, 0) == 0, "filter"); /* no nnp: SYS_ADMIN */
    SETUP_CHECK(prctl(PR_CAPBSET_DROP, CAP_MKNOD, 0, 0, 0) == 0, "bounding");
    uint64_t e, p, i;
    cap_get(&e, &p, &i);
    uint64_t drop = BIT(CAP_SYS_ADMIN) | BIT(CAP_NET_ADMIN) | BIT(CAP_CHOWN);
    SETUP_CHECK(cap_set(e & ~drop, p & ~drop, i) == 0, "capset");
    snapshot(&w_main);
    w_main.deny_pgrp = 0;
}

/* strictmain: t1 sets itself up like `root` (capabilities and filters are per thread),
   handles SIGUSR2 and verifies; the main thread serves a pipe in strict mode. */
static int main_cmd[2];
static sigset_t usr2_old;

static void *strict_verifier(void *arg)
{
    (void)arg;
    thr[0].tid = (pid_t)syscall(SYS_gettid);
    if (install_filter(SYS_getppid, DENY_ALL, 0) != 0 ||
        prctl(PR_CAPBSET_DROP, CAP_MKNOD, 0, 0, 0) != 0)
        setup_err = __LINE__;
    uint64_t e, p, i, drop = BIT(CAP_SYS_ADMIN) | BIT(CAP_NET_ADMIN) | BIT(CAP_CHOWN);
    cap_get(&e, &p, &i);
    if (cap_set(e & ~drop, p & ~drop, i) != 0)
        setup_err = __LINE__;
    snapshot(&w_t[0]);
    w_t[0].deny_pgrp = 0;
    if (write(reply[1], "r", 1) != 1)
        setup_err = __LINE__;
    while (!got_usr2)
        sigsuspend(&usr2_old);
    check("t1", &w_t[0]);
    if (write(main_cmd[1], "c", 1) != 1)
        fail("ask_main");
    struct pollfd pf = {reply[0], POLLIN, 0};
    char r;
    if (poll(&pf, 1, 20000) != 1 || read(reply[0], &r, 1) != 1)
        fail("no_reply_main");
    char *st;
    CHECK(read_file("/proc/self/status", &st) >= 0 &&
              strstr(st, "\nSeccomp:\t1\n"),
          "main_not_strict");
    char *lu;
    CHECK(read_file("/proc/self/loginuid", &lu) >= 0 && atoi(lu) == LOGINUID, "loginuid");
    finish("mode=strictmain");
}

static void strict_main(void)
{
    gid_t groups[3] = {10, 20, 30};
    SETUP_CHECK(setgroups(3, groups) == 0, "setgroups"); /* before there are threads */
    SETUP_CHECK(pipe(reply) == 0 && pipe(main_cmd) == 0, "pipe");
    SETUP_CHECK(pthread_create(&thr[0].th, NULL, strict_verifier, NULL) == 0, "thread");
    char c;
    SETUP_CHECK(read(reply[0], &c, 1) == 1 && setup_err == 0, "verifier");
    say("READY pid=%d child=0 t1=%d t2=0 t3=0 s=0", (int)getpid(), (int)thr[0].tid);
    SETUP_CHECK(prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT, 0, 0, 0) == 0, "strict");
    for (;;) {
        long r = syscall(SYS_read, main_cmd[0], &c, 1);
        if (r == 1)
            syscall(SYS_write, reply[1], "s", 1);
    }
}

int main(int argc, char **argv)
{
    mode = argc > 1 ? argv[1] : "nobody";
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    for (int c = 0; c <= last_cap(); c++) /* the bounding set it started with */
        if (prctl(PR_CAPBSET_READ, c, 0, 0, 0) == 1)
            all_caps |= BIT(c);
    int fd = open("owned", O_CREAT | O_WRONLY, 0644); /* root's: chown needs CAP_CHOWN */
    SETUP_CHECK(fd >= 0 && fchown(fd, 0, 0) == 0, "owned");
    close(fd);
    set_loginuid();
    if (strcmp(mode, "strictmain") == 0) {
        usr2_old = old;
        strict_main();
    }
    pid_t child = 0;
    struct stat root_st;
    memset(&root_st, 0, sizeof(root_st));

    if (strcmp(mode, "nobody") == 0) {
        setup_nobody();
    } else {
        SETUP_CHECK(strcmp(mode, "root") == 0 || strcmp(mode, "chroot") == 0 ||
                        strcmp(mode, "strict") == 0 || strcmp(mode, "tree") == 0 ||
                        strcmp(mode, "noway") == 0 || strcmp(mode, "nosigmask") == 0,
                    "mode");
        setup_root(strcmp(mode, "strict") == 0);
        if (strcmp(mode, "noway") == 0 || strcmp(mode, "nosigmask") == 0) {
            start_threads(1, 3);
            char c;
            SETUP_CHECK(read(reply[0], &c, 1) == 1 && setup_err == 0, "filtered thread");
        }
        if (strcmp(mode, "chroot") == 0) {
            fd = open("marker", O_CREAT | O_WRONLY, 0644);
            SETUP_CHECK(fd >= 0, "marker");
            close(fd);
            SETUP_CHECK(chroot(".") == 0, "chroot");
            SETUP_CHECK(stat("/", &root_st) == 0, "stat /");
        }
        if (strcmp(mode, "tree") == 0) {
            int ready[2];
            SETUP_CHECK(pipe(ready) == 0, "pipe");
            child = fork();
            SETUP_CHECK(child >= 0, "fork");
            if (child == 0) {
                SETUP_CHECK(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0, "child nnp");
                SETUP_CHECK(install_filter(SYS_getpgrp, DENY_T2, 0) == 0, "child filter");
                w_main.deny_pgrp = 1;
                w_main.nnp = 1;
                SETUP_CHECK(write(ready[1], "x", 1) == 1, "child ready");
                while (!got_usr2)
                    sigsuspend(&old);
                check("child", &w_main);
                finish("role=child");
            }
            char c;
            SETUP_CHECK(read(ready[0], &c, 1) == 1, "child set up");
        }
    }
    say("READY pid=%d child=%d t1=%d t2=%d t3=%d s=%d", (int)getpid(), (int)child,
        (int)thr[0].tid, (int)thr[1].tid, (int)thr[2].tid, (int)thr[3].tid);

    while (!got_usr2)
        sigsuspend(&old);
    check("main", &w_main);
    if (strcmp(mode, "nobody") == 0) {
        for (int k = 0; k < 3; k++)
            ask(&thr[k], 'c');
        /* t2 has a filter of its own: once it is gone, main's TSYNC succeeds only if t1
           and t3 share main's filter (copies of it would not be its ancestors) */
        ask(&thr[1], 'q');
        pthread_join(thr[1].th, NULL);
        int r = allow_all_tsync();
        CHECK(r == 0, "tsync=%d/%d", r, errno);
    }
    if (strcmp(mode, "nosigmask") == 0) {
        char r = 0;
        if (write(thr[3].cmd[1], "c", 1) != 1 || read(reply[0], &r, 1) != 1 || r != 'f')
            fail("nosigmask_thread=%c", r ? r : '0');
    }
    if (strcmp(mode, "strict") == 0) {
        ask(&thr[3], 'c'); /* it answers with read/write only */
        char path[64], *st;
        snprintf(path, sizeof(path), "/proc/self/task/%d/status", (int)thr[3].tid);
        CHECK(read_file(path, &st) >= 0 && strstr(st, "\nSeccomp:\t1\n"), "strict_mode");
    }
    if (strcmp(mode, "chroot") == 0) {
        struct stat now;
        CHECK(stat("/", &now) == 0 && now.st_dev == root_st.st_dev &&
                  now.st_ino == root_st.st_ino,
              "root_moved");
        CHECK(access("/marker", F_OK) == 0, "no_marker");
        CHECK(access("/proc/self", F_OK) != 0, "sees_proc");
    } else {
        char *lu;
        CHECK(read_file("/proc/self/loginuid", &lu) >= 0 && atoi(lu) == LOGINUID,
              "loginuid");
    }
    if (child) {
        kill(child, SIGUSR2);
        int st;
        CHECK(waitpid(child, &st, 0) == child && WIFEXITED(st) && WEXITSTATUS(st) == 0,
              "child_failed");
    }
    char extra[32];
    snprintf(extra, sizeof(extra), "mode=%s", mode);
    finish(extra);
}
