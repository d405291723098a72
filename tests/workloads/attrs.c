/* attrs: process and thread attributes (issue 15 parts 3 and 5), checked by the process.
 *
 * usage: attrs FEATURES      comma-separated, or "all" (every one but sud, tree and cow)
 * READY pid= tids=MAIN,W1,W2 cpuid=0|1 thp=N child=PID(tree)
 *   then waits for SIGUSR2 and prints VERIFY OK pid= / VERIFY FAIL pid= reason=...
 *   (a tree's child prints its own VERIFY line when it gets SIGUSR2)
 *
 * Three threads: main, w1, w2; each sets its own per-thread attributes and checks
 * them itself when asked (a worker's prctl state is only readable by itself).
 *   sched      main SCHED_OTHER nice 7; w1 SCHED_FIFO 7 + RESET_ON_FORK, nice -3
 *              underneath; w2 SCHED_BATCH nice 3   (sched_getattr of each tid)
 *   affinity   main {0}, w1 {last CPU}
 *   ioprio     main BE/6, w1 IDLE, w2 RT/2
 *   slack      main 123456 ns, w2 777000 ns (PR_GET_TIMERSLACK in each)
 *   pdeath     main SIGURG, w1 SIGWINCH (PR_GET_PDEATHSIG in each)
 *   tsc        w2 PR_TSC_SIGSEGV
 *   mce        main PR_MCE_KILL_EARLY, w1 PR_MCE_KILL_LATE
 *   cpuid      w2 ARCH_SET_CPUID 0 (cpuid faults) where the CPU can
 *   mempolicy  main MPOL_BIND {0}, w1 MPOL_PREFERRED {0}, w2 MPOL_INTERLEAVE with
 *              MPOL_F_STATIC_NODES {0} (get_mempolicy in each)
 *   oom        oom_score_adj 321
 *   coredump   coredump_filter 0x23
 *   membarrier PRIVATE_EXPEDITED, GLOBAL_EXPEDITED (+SYNC_CORE, RSEQ if offered):
 *              GET_REGISTRATIONS unchanged and MEMBARRIER_CMD_PRIVATE_EXPEDITED works
 *   guard      8 anonymous pages, guard regions on pages 2-3 and 6: the other pages
 *              keep their content, a write into a guard page kills a forked child
 *              with SIGSEGV, and so does a read
 *   timers     a SIGEV_THREAD_ID timer to w1 (SIGRTMIN+3) and a glibc SIGEV_THREAD
 *              timer, both every 20 ms: both keep firing (the first only in w1)
 *   names      2 anonymous pages named "ckpt-attrs" (PR_SET_VMA_ANON_NAME)
 *   ksm        PR_SET_MEMORY_MERGE 1
 *   thp        PR_SET_THP_DISABLE with PR_THP_DISABLE_EXCEPT_ADVISED where known
 *   seal       4 pages sealed with mseal: munmap and mprotect fail (EPERM), content kept
 *   droppable  4 MAP_DROPPABLE pages: still "dp" in smaps
 *   sud        syscall user dispatch on (selector ALLOW): ckpt must refuse it
 *   tree       a child made by clone() with exit signal SIGURG, with a parent-death
 *              signal (SIGWINCH): its exit signal and pdeathsig come back, and its
 *              parent is the restored parent
 *   cow        (with tree) 8 MiB filled before the clone; then the child rewrites pages
 *              0-255 and drops 256-263 (MADV_DONTNEED), the parent rewrites 512-767;
 *              each sees its own content (the rest is still shared copy-on-write:
 *              the test counts the shared page frames). READY cow=ADDR
 */
#include "wl.h"

#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>

#ifndef PR_SET_VMA
#define PR_SET_VMA 0x53564d41
#define PR_SET_VMA_ANON_NAME 0
#endif
#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#define PR_GET_MEMORY_MERGE 68
#endif
#ifndef PR_SET_SYSCALL_USER_DISPATCH
#define PR_SET_SYSCALL_USER_DISPATCH 59
#endif
#define SUD_ON 1
#define SUD_ALLOW 0
#define THP_EXCEPT_ADVISED (1 << 1)
#define MADV_GUARD_INSTALL_ 102
#define MAP_DROPPABLE_ 0x08
#define ARCH_GET_CPUID 0x1011
#define ARCH_SET_CPUID 0x1012
#define IOPRIO(cls, data) (((cls) << 13) | (data))
#define MPOL_PREFERRED 1
#define MPOL_BIND 2
#define MPOL_INTERLEAVE 3
#define MPOL_F_STATIC_NODES (1 << 15)
static const int mpol_want[3] = {MPOL_BIND, MPOL_PREFERRED,
                                 MPOL_INTERLEAVE | MPOL_F_STATIC_NODES};
#define SCHED_FLAG_RESET_ON_FORK 0x01

struct sched_attr_ {
    uint32_t size, policy;
    uint64_t flags;
    int32_t nice;
    uint32_t priority;
    uint64_t runtime, deadline, period;
    uint32_t util_min, util_max;
};

static char feats[512];
static int has(const char *f)
{
    if (strcmp(feats, "all") == 0)
        return strcmp(f, "sud") && strcmp(f, "tree") && strcmp(f, "cow");
    size_t n = strlen(f);
    for (const char *p = feats; (p = strstr(p, f)); p += n)
        if ((p == feats || p[-1] == ',') && (p[n] == ',' || p[n] == 0))
            return 1;
    return 0;
}

static int sched_get(pid_t tid, struct sched_attr_ *a)
{
    memset(a, 0, sizeof(*a));
    return (int)syscall(SYS_sched_getattr, tid, a, sizeof(*a), 0);
}

static int sched_set(pid_t tid, uint32_t policy, uint64_t flags, int nice, uint32_t prio)
{
    struct sched_attr_ a;
    memset(&a, 0, sizeof(a));
    a.size = sizeof(a);
    a.policy = policy;
    a.flags = flags;
    a.nice = nice;
    a.priority = prio;
    return (int)syscall(SYS_sched_setattr, tid, &a, 0);
}

static int ncpus;
static int cpuid_ok, thp_want, names_ok;
static pid_t tids[3];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int gen, done, ready;
static volatile sig_atomic_t got_usr2;
static volatile long tid_ticks, tid_bad, thread_ticks;
static pid_t child_pid;

static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static void on_tick(int sig)
{
    (void)sig;
    if (syscall(SYS_gettid) == tids[1])
        tid_ticks++;
    else
        tid_bad++;
}

static void on_thread_timer(union sigval v)
{
    (void)v;
    __atomic_add_fetch(&thread_ticks, 1, __ATOMIC_RELAXED);
}

static void locked_fail(const char *what, long got, long want)
{
    pthread_mutex_lock(&mu);
    fail("%s: %ld, want %ld", what, got, want);
    pthread_mutex_unlock(&mu);
}

#define WANT(what, got, want)                          \
    do {                                               \
        long g_ = (long)(got), w_ = (long)(want);      \
        if (g_ != w_)                                  \
            locked_fail(what, g_, w_);                 \
    } while (0)

/* ---- per-thread setup and checks (run by the thread itself) ---------------- */

static void setup_self(int who)
{
    pid_t tid = (pid_t)syscall(SYS_gettid);
    tids[who] = tid;
    if (has("sched")) {
        if (who == 0)
            SETUP_CHECK(sched_set(tid, SCHED_OTHER, 0, 7, 0) == 0, "sched main");
        if (who == 1) {
            SETUP_CHECK(sched_set(tid, SCHED_OTHER, 0, -3, 0) == 0, "nice w1");
            SETUP_CHECK(sched_set(tid, SCHED_FIFO, SCHED_FLAG_RESET_ON_FORK, -3, 7) == 0,
                        "sched w1");
        }
        if (who == 2)
            SETUP_CHECK(sched_set(tid, SCHED_BATCH, 0, 3, 0) == 0, "sched w2");
    }
    if (has("affinity") && who < 2) {
        cpu_set_t s;
        CPU_ZERO(&s);
        CPU_SET(who == 0 ? 0 : ncpus - 1, &s);
        SETUP_CHECK(sched_setaffinity(0, sizeof(s), &s) == 0, "sched_setaffinity");
    }
    if (has("ioprio")) {
        int v = who == 0 ? IOPRIO(2, 6) : who == 1 ? IOPRIO(3, 0) : IOPRIO(1, 2);
        SETUP_CHECK(syscall(SYS_ioprio_set, 1, 0, v) == 0, "ioprio_set");
    }
    if (has("slack") && who != 1) /* w1 may be real-time: its slack is 0 */
        SETUP_CHECK(prctl(PR_SET_TIMERSLACK, who == 0 ? 123456 : 777000, 0, 0, 0) == 0,
                    "PR_SET_TIMERSLACK");
    if (has("pdeath") && who < 2)
        SETUP_CHECK(prctl(PR_SET_PDEATHSIG, who == 0 ? SIGURG : SIGWINCH) == 0,
                    "PR_SET_PDEATHSIG");
    if (has("mce") && who < 2)
        SETUP_CHECK(prctl(PR_MCE_KILL, PR_MCE_KILL_SET,
                          who == 0 ? PR_MCE_KILL_EARLY : PR_MCE_KILL_LATE, 0, 0) == 0,
                    "PR_MCE_KILL");
    if (has("tsc") && who == 2)
        SETUP_CHECK(prctl(PR_SET_TSC, PR_TSC_SIGSEGV, 0, 0, 0) == 0, "PR_SET_TSC");
    if (has("mempolicy")) {
        unsigned long node0 = 1;
        SETUP_CHECK(syscall(SYS_set_mempolicy, mpol_want[who], &node0, 64) == 0,
                    "set_mempolicy");
    }
    if (has("cpuid") && who == 2)
        cpuid_ok = syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) == 0;
}

/* No clock reads here: w2 may have rdtsc (vDSO clocks) or cpuid faulting. */
static void check_self(int who)
{
    pid_t tid = (pid_t)syscall(SYS_gettid);
    WANT("thread id", tid, tids[who]);
    if (has("slack") && who != 1)
        WANT(who ? "w2 timer slack" : "main timer slack", prctl(PR_GET_TIMERSLACK),
             who == 0 ? 123456 : 777000);
    if (has("pdeath") && who < 2) {
        int sig = -1;
        prctl(PR_GET_PDEATHSIG, &sig);
        WANT(who ? "w1 pdeathsig" : "main pdeathsig", sig, who == 0 ? SIGURG : SIGWINCH);
    }
    if (has("mce") && who < 2)
        WANT(who ? "w1 mce kill" : "main mce kill", prctl(PR_MCE_KILL_GET, 0, 0, 0, 0),
             who == 0 ? PR_MCE_KILL_EARLY : PR_MCE_KILL_LATE);
    if (has("tsc") && who == 2) {
        int v = -1;
        prctl(PR_GET_TSC, &v);
        WANT("w2 PR_GET_TSC", v, PR_TSC_SIGSEGV);
    }
    if (has("mempolicy")) {
        int mode = -1;
        unsigned long nodes[16] = {0};
        syscall(SYS_get_mempolicy, &mode, nodes, 1024, 0, 0);
        WANT("memory policy", mode, mpol_want[who]);
        WANT("memory policy nodes", nodes[0], 1);
    }
    if (has("cpuid") && who == 2 && cpuid_ok)
        WANT("w2 ARCH_GET_CPUID", syscall(SYS_arch_prctl, ARCH_GET_CPUID, 0), 0);
}

static void *worker(void *arg)
{
    int who = (int)(intptr_t)arg;
    setup_self(who);
    pthread_mutex_lock(&mu);
    ready++;
    pthread_cond_broadcast(&cv);
    int seen = gen;
    for (;;) {
        while (gen == seen)
            pthread_cond_wait(&cv, &mu);
        seen = gen;
        pthread_mutex_unlock(&mu);
        check_self(who);
        pthread_mutex_lock(&mu);
        done++;
        pthread_cond_broadcast(&cv);
    }
    return NULL;
}

/* ---- process-wide checks (main thread) ------------------------------------- */

static void check_sched(void)
{
    struct sched_attr_ a;
    static const uint32_t pol[3] = {SCHED_OTHER, SCHED_FIFO, SCHED_BATCH};
    static const int nice[3] = {7, -3, 3};
    static const uint32_t prio[3] = {0, 7, 0};
    for (int i = 0; i < 3; i++) {
        if (sched_get(tids[i], &a) != 0) {
            fail("sched_getattr(%d) errno %d", tids[i], errno);
            continue;
        }
        /* sched_getattr shows nice 0 for a real-time thread: getpriority shows its own */
        errno = 0;
        int n = getpriority(PRIO_PROCESS, (id_t)tids[i]);
        CHECK(a.policy == pol[i] && n == nice[i] && a.priority == prio[i] &&
                  !!(a.flags & SCHED_FLAG_RESET_ON_FORK) == (i == 1),
              "thread %d: policy %u nice %d prio %u flags %#llx, want %u %d %u", i, a.policy, n,
              a.priority, (unsigned long long)a.flags, pol[i], nice[i], prio[i]);
    }
}

static void check_affinity(void)
{
    for (int i = 0; i < 2; i++) {
        cpu_set_t s;
        CPU_ZERO(&s);
        CHECK(sched_getaffinity(tids[i], sizeof(s), &s) == 0, "sched_getaffinity");
        int want = i == 0 ? 0 : ncpus - 1;
        CHECK(CPU_COUNT(&s) == 1 && CPU_ISSET(want, &s), "thread %d affinity: %d CPUs, want {%d}",
              i, CPU_COUNT(&s), want);
    }
}

static void check_ioprio(void)
{
    int want[3] = {IOPRIO(2, 6), IOPRIO(3, 0), IOPRIO(1, 2)};
    for (int i = 0; i < 3; i++) {
        long v = syscall(SYS_ioprio_get, 1, tids[i]);
        CHECK(v == want[i], "thread %d ioprio %#lx, want %#x", i, v, want[i]);
    }
}

static long read_long(const char *path, int base)
{
    char *s;
    if (read_file(path, &s) < 0)
        return -99999;
    long v = strtol(s, NULL, base);
    free(s);
    return v;
}

static int mb_wanted;
#define MB_CMD(x) ((int)syscall(SYS_membarrier, (x), 0, 0))

static void setup_membarrier(void)
{
    int q = MB_CMD(0);
    SETUP_CHECK(q > 0, "MEMBARRIER_CMD_QUERY");
    int regs[4] = {1 << 4, 1 << 2, 1 << 6, 1 << 8}; /* REGISTER_PRIVATE_EXPEDITED, GLOBAL_EXP,
                                                       SYNC_CORE, RSEQ */
    for (int i = 0; i < 4; i++) {
        if (!(q & regs[i]))
            continue;
        SETUP_CHECK(MB_CMD(regs[i]) == 0, "membarrier register");
        mb_wanted |= regs[i];
    }
}

static void check_membarrier(void)
{
    int got = MB_CMD(1 << 9); /* GET_REGISTRATIONS */
    CHECK(got == mb_wanted, "membarrier registrations %#x, want %#x", got, mb_wanted);
    CHECK(MB_CMD(1 << 3) == 0, "MEMBARRIER_CMD_PRIVATE_EXPEDITED errno %d", errno);
}

static unsigned char *guard_area;
#define GUARD_PAGES 8
static int is_guard(int i) { return i == 2 || i == 3 || i == 6; }

static void setup_guard(void)
{
    guard_area = mmap(NULL, GUARD_PAGES * WL_PAGE, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    SETUP_CHECK(guard_area != MAP_FAILED, "mmap guard area");
    for (int i = 0; i < GUARD_PAGES; i++)
        memset(guard_area + i * WL_PAGE, 0x40 + i, WL_PAGE);
    SETUP_CHECK(madvise(guard_area + 2 * WL_PAGE, 2 * WL_PAGE, MADV_GUARD_INSTALL_) == 0,
                "MADV_GUARD_INSTALL");
    SETUP_CHECK(madvise(guard_area + 6 * WL_PAGE, WL_PAGE, MADV_GUARD_INSTALL_) == 0,
                "MADV_GUARD_INSTALL");
}

/* 1: the access killed a child with SIGSEGV */
static int faults_in_child(volatile unsigned char *p, int write)
{
    pid_t c = fork();
    if (c == 0) {
        if (write)
            *p = 1;
        else
            (void)*p;
        _exit(0);
    }
    int st = 0;
    if (c < 0 || waitpid(c, &st, 0) != c)
        return -1;
    return WIFSIGNALED(st) && WTERMSIG(st) == SIGSEGV;
}

static void check_guard(void)
{
    for (int i = 0; i < GUARD_PAGES; i++) {
        unsigned char *pg = guard_area + i * WL_PAGE;
        if (is_guard(i)) {
            CHECK(faults_in_child(pg + 100, 1) == 1, "a write into guard page %d did not fault",
                  i);
            CHECK(faults_in_child(pg, 0) == 1, "a read of guard page %d did not fault", i);
            continue;
        }
        int same = 1;
        for (size_t k = 0; k < WL_PAGE; k++)
            same &= pg[k] == 0x40 + i;
        CHECK(same, "page %d next to the guard regions lost its content", i);
    }
}

static timer_t tid_timer, thread_timer;

static void setup_timers(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_tick;
    sa.sa_flags = SA_RESTART;
    SETUP_CHECK(sigaction(SIGRTMIN + 3, &sa, NULL) == 0, "sigaction");
    struct sigevent sev;
    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = SIGRTMIN + 3;
    sev._sigev_un._tid = tids[1];
    SETUP_CHECK(timer_create(CLOCK_MONOTONIC, &sev, &tid_timer) == 0, "timer_create tid");
    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_THREAD;
    sev.sigev_notify_function = on_thread_timer;
    SETUP_CHECK(timer_create(CLOCK_MONOTONIC, &sev, &thread_timer) == 0, "timer_create thread");
    struct itimerspec its = {{0, 20000000}, {0, 20000000}};
    SETUP_CHECK(timer_settime(tid_timer, 0, &its, NULL) == 0, "timer_settime");
    SETUP_CHECK(timer_settime(thread_timer, 0, &its, NULL) == 0, "timer_settime");
}

static void check_timers(void)
{
    struct itimerspec its;
    CHECK(timer_gettime(tid_timer, &its) == 0 && its.it_interval.tv_nsec == 20000000,
          "SIGEV_THREAD_ID timer lost (errno %d)", errno);
    CHECK(timer_gettime(thread_timer, &its) == 0 && its.it_interval.tv_nsec == 20000000,
          "SIGEV_THREAD timer lost (errno %d)", errno);
    long t0 = tid_ticks, h0 = __atomic_load_n(&thread_ticks, __ATOMIC_RELAXED);
    double end = mono_now() + 30;
    while ((tid_ticks < t0 + 5 || __atomic_load_n(&thread_ticks, __ATOMIC_RELAXED) < h0 + 5) &&
           mono_now() < end)
        usleep(5000);
    CHECK(tid_ticks >= t0 + 5, "SIGEV_THREAD_ID timer stopped (%ld ticks)", tid_ticks - t0);
    CHECK(__atomic_load_n(&thread_ticks, __ATOMIC_RELAXED) >= h0 + 5,
          "SIGEV_THREAD timer stopped (%ld ticks)", thread_ticks - h0);
    CHECK(tid_bad == 0, "%ld SIGEV_THREAD_ID ticks reached the wrong thread", (long)tid_bad);
}

static unsigned char *named, *sealed, *dropped;

/* the /proc/self/smaps header line and VmFlags of the VMA holding p, into line/flags */
static int smaps_of(void *p, char *line, size_t ll, char *flags, size_t fl)
{
    char *s;
    if (read_file("/proc/self/smaps", &s) < 0)
        return -1;
    int found = 0;
    for (char *l = strtok(s, "\n"); l; l = strtok(NULL, "\n")) {
        unsigned long a, b;
        if (sscanf(l, "%lx-%lx ", &a, &b) == 2) { /* a VMA's first line */
            found = (uintptr_t)p >= a && (uintptr_t)p < b;
            if (found)
                snprintf(line, ll, "%s", l);
        } else if (found && strncmp(l, "VmFlags:", 8) == 0) {
            snprintf(flags, fl, "%s ", l + 8);
            free(s);
            return 0;
        }
    }
    free(s);
    return -1;
}

static void check_names(void)
{
    char line[512] = "", flags[256] = "";
    CHECK(smaps_of(named, line, sizeof(line), flags, sizeof(flags)) == 0 &&
              strstr(line, "[anon:ckpt-attrs]"),
          "anonymous memory name lost: %s", line);
    CHECK(named[0] == 0x5a && named[WL_PAGE] == 0x5b, "named memory lost its content");
}

static void check_seal(void)
{
    for (int i = 0; i < 4; i++)
        CHECK(sealed[i * WL_PAGE] == 0x70 + i, "sealed page %d lost its content", i);
    errno = 0;
    CHECK(mprotect(sealed, WL_PAGE, PROT_READ) != 0 && errno == EPERM,
          "mprotect of sealed memory: errno %d", errno);
    errno = 0; /* last: unsealed, the page is gone */
    CHECK(munmap(sealed + 3 * WL_PAGE, WL_PAGE) != 0 && errno == EPERM,
          "munmap of sealed memory: errno %d", errno);
}

static void check_droppable(void)
{
    char line[512] = "", flags[256] = "";
    CHECK(smaps_of(dropped, line, sizeof(line), flags, sizeof(flags)) == 0 &&
              strstr(flags, " dp "),
          "MAP_DROPPABLE lost: VmFlags%s", flags);
}

/* Syscall user dispatch still on: with the selector at BLOCK a syscall raises SIGSYS
   (the handler allows syscalls again, so that its own sigreturn goes through). */
static volatile char sud_selector = SUD_ALLOW;
static volatile sig_atomic_t sud_sigsys;

static void on_sigsys(int sig)
{
    (void)sig;
    sud_selector = SUD_ALLOW;
    sud_sigsys++;
}

static void check_sud(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_sigsys;
    sigaction(SIGSYS, &sa, NULL);
    sud_selector = 1; /* SYSCALL_DISPATCH_FILTER_BLOCK */
    syscall(SYS_getppid);
    sud_selector = SUD_ALLOW;
    CHECK(sud_sigsys == 1, "syscall user dispatch is off (%d SIGSYS)", (int)sud_sigsys);
}

#define COW_PAGES 2048
static unsigned char *cow_area;

static unsigned char cow_want(int page, int child)
{
    if (child && page < 256)
        return 0xc0;
    if (child && page >= 256 && page < 264)
        return 0;
    if (!child && page >= 512 && page < 768)
        return 0xa0;
    return (unsigned char)(page % 255 + 1); /* never 0: a zero page is not restored */
}

static void cow_set(int child)
{
    for (int i = 0; i < COW_PAGES; i++) {
        unsigned char *pg = cow_area + (size_t)i * WL_PAGE;
        if (child && i >= 256 && i < 264)
            continue;
        if ((child && i < 256) || (!child && i >= 512 && i < 768))
            memset(pg, cow_want(i, child), WL_PAGE);
    }
    if (child)
        SETUP_CHECK(madvise(cow_area + 256 * WL_PAGE, 8 * WL_PAGE, MADV_DONTNEED) == 0,
                    "MADV_DONTNEED");
}

static void cow_check(int child)
{
    int bad = 0, first = -1;
    for (int i = 0; i < COW_PAGES; i++) {
        unsigned char *pg = cow_area + (size_t)i * WL_PAGE, want = cow_want(i, child);
        if (pg[0] != want || pg[WL_PAGE - 1] != want || pg[WL_PAGE / 2] != want) {
            if (first < 0)
                first = i;
            bad++;
        }
    }
    CHECK(bad == 0, "%d copy-on-write pages have the wrong content (first: page %d)", bad,
          first);
}

static void tree_child(void)
{
    SETUP_CHECK(prctl(PR_SET_PDEATHSIG, SIGWINCH) == 0, "child PR_SET_PDEATHSIG");
    pid_t parent = getppid();
    if (cow_area)
        cow_set(1);
    sigset_t old;
    sigprocmask(SIG_BLOCK, NULL, &old);
    sigdelset(&old, SIGUSR2); /* blocked by main() before the clone */
    say("CHILD pid=%d", (int)getpid());
    while (!got_usr2)
        sigsuspend(&old);
    int sig = -1;
    prctl(PR_GET_PDEATHSIG, &sig);
    CHECK(sig == SIGWINCH, "child pdeathsig %d, want %d", sig, SIGWINCH);
    CHECK(getppid() == parent, "child's parent %d, want %d", (int)getppid(), (int)parent);
    if (cow_area)
        cow_check(1);
    finish("child=1");
}

static long stat_field(pid_t pid, int n)
{
    char path[64], *s;
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    if (read_file(path, &s) < 0)
        return -1;
    char *p = strrchr(s, ')');
    long v = -1;
    for (int i = 3; p && i <= n; i++) {
        p = strchr(p + 1, ' ');
        if (p && i == n)
            v = strtol(p + 1, NULL, 10);
    }
    free(s);
    return v;
}

int main(int argc, char **argv)
{
    SETUP_CHECK(argc > 1, "usage: attrs FEATURES");
    snprintf(feats, sizeof(feats), "%s", argv[1]);
    ncpus = (int)sysconf(_SC_NPROCESSORS_ONLN);
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old); /* threads inherit SIGUSR2 blocked */
    if (has("cow")) {
        cow_area = mmap(NULL, COW_PAGES * WL_PAGE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        SETUP_CHECK(cow_area != MAP_FAILED, "mmap cow");
        for (int i = 0; i < COW_PAGES; i++)
            memset(cow_area + (size_t)i * WL_PAGE, (unsigned char)(i % 255 + 1), WL_PAGE);
    }
    if (has("tree") || has("cow")) {
        child_pid = (pid_t)syscall(SYS_clone, SIGURG, 0, 0, 0, 0);
        SETUP_CHECK(child_pid >= 0, "clone");
        if (child_pid == 0)
            tree_child();
        if (cow_area)
            cow_set(0);
    }
    tids[0] = (pid_t)syscall(SYS_gettid);
    pthread_t th[2];
    for (int i = 1; i <= 2; i++)
        SETUP_CHECK(pthread_create(&th[i - 1], NULL, worker, (void *)(intptr_t)i) == 0,
                    "pthread_create");
    pthread_mutex_lock(&mu);
    while (ready < 2)
        pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    setup_self(0);
    if (has("oom")) {
        int fd = open("/proc/self/oom_score_adj", O_WRONLY);
        SETUP_CHECK(fd >= 0 && write(fd, "321", 3) == 3, "oom_score_adj");
        close(fd);
    }
    if (has("coredump")) {
        int fd = open("/proc/self/coredump_filter", O_WRONLY);
        SETUP_CHECK(fd >= 0 && write(fd, "0x23", 4) == 4, "coredump_filter");
        close(fd);
    }
    if (has("membarrier"))
        setup_membarrier();
    if (has("guard"))
        setup_guard();
    if (has("timers"))
        setup_timers();
    if (has("names")) {
        named = mmap(NULL, 2 * WL_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
        SETUP_CHECK(named != MAP_FAILED, "mmap named");
        named[0] = 0x5a;
        named[WL_PAGE] = 0x5b;
        names_ok = prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, named, 2 * WL_PAGE, "ckpt-attrs") == 0;
        SETUP_CHECK(names_ok || errno == EINVAL, "PR_SET_VMA_ANON_NAME");
    }
    if (has("ksm"))
        SETUP_CHECK(prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) == 0, "PR_SET_MEMORY_MERGE");
    if (has("thp")) {
        thp_want = 3;
        if (prctl(PR_SET_THP_DISABLE, 1, THP_EXCEPT_ADVISED, 0, 0) != 0) {
            SETUP_CHECK(prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0, "PR_SET_THP_DISABLE");
            thp_want = 1;
        }
    }
    if (has("seal")) {
        sealed = mmap(NULL, 4 * WL_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                      -1, 0);
        SETUP_CHECK(sealed != MAP_FAILED, "mmap sealed");
        for (int i = 0; i < 4; i++)
            memset(sealed + i * WL_PAGE, 0x70 + i, WL_PAGE);
        SETUP_CHECK(syscall(462, sealed, 4 * WL_PAGE, 0) == 0, "mseal");
    }
    if (has("droppable")) {
        dropped = mmap(NULL, 4 * WL_PAGE, PROT_READ | PROT_WRITE, MAP_DROPPABLE_ | MAP_ANONYMOUS,
                       -1, 0);
        SETUP_CHECK(dropped != MAP_FAILED, "mmap MAP_DROPPABLE");
        memset(dropped, 0x33, 4 * WL_PAGE);
    }
    if (has("sud"))
        SETUP_CHECK(prctl(PR_SET_SYSCALL_USER_DISPATCH, SUD_ON, 0, 0, &sud_selector) == 0,
                    "PR_SET_SYSCALL_USER_DISPATCH");
    say("READY pid=%d tids=%d,%d,%d cpuid=%d thp=%d names=%d child=%d cow=%#lx", (int)getpid(),
        (int)tids[0], (int)tids[1], (int)tids[2], cpuid_ok, thp_want, names_ok, (int)child_pid,
        (unsigned long)(uintptr_t)cow_area);

    while (!got_usr2)
        sigsuspend(&old);

    pthread_mutex_lock(&mu);
    done = 0;
    gen++;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    check_self(0);
    pthread_mutex_lock(&mu);
    while (done < 2)
        pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    if (has("sched"))
        check_sched();
    if (has("affinity"))
        check_affinity();
    if (has("ioprio"))
        check_ioprio();
    if (has("oom"))
        CHECK(read_long("/proc/self/oom_score_adj", 10) == 321, "oom_score_adj %ld, want 321",
              read_long("/proc/self/oom_score_adj", 10));
    if (has("coredump"))
        CHECK(read_long("/proc/self/coredump_filter", 16) == 0x23,
              "coredump_filter %#lx, want 0x23", read_long("/proc/self/coredump_filter", 16));
    if (has("membarrier"))
        check_membarrier();
    if (has("guard"))
        check_guard();
    if (has("timers"))
        check_timers();
    if (has("names") && names_ok) /* without CONFIG_ANON_VMA_NAME: EINVAL */
        check_names();
    if (has("ksm"))
        CHECK(prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0) == 1, "PR_GET_MEMORY_MERGE %d, want 1",
              prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0));
    if (has("thp"))
        CHECK(prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) == thp_want, "PR_GET_THP_DISABLE %d, want %d",
              prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0), thp_want);
    if (has("seal"))
        check_seal();
    if (has("droppable"))
        check_droppable();
    if (has("sud"))
        check_sud();
    if (cow_area)
        cow_check(0);
    if (has("tree") || has("cow"))
        CHECK(stat_field(child_pid, 38) == SIGURG, "child's exit signal %ld, want %d",
              stat_field(child_pid, 38), SIGURG);
    finish("");
}
