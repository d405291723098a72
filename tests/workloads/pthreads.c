/* pthreads: threads in different states, each with its own per-thread kernel state.
 *
 * usage: pthreads [NSPIN [churn|handlers]]   (NSPIN extra spinning threads, default 0)
 *        churn: one more thread that keeps creating and joining short-lived
 *        threads, so threads appear and vanish while ckpt attaches.
 *        handlers: SIGURG, SIGWINCH and SIGCHLD get handlers (none is ignored, so a
 *        dump's per-thread injections cannot run as programs ending on one of them:
 *        kernel/inject_batch.py); a handler that runs fails the verification.
 *        blocked: the threads block SIGURG, SIGWINCH and SIGCHLD too (a program's
 *        marker is then a signal its thread blocks).
 *        pending: each thread sends itself (tgkill: SI_TKILL or SI_USER by kernel, which
 *        only the thread itself may queue again) SIGUSR1 and its own signal, both
 *        blocked, and checks they are still pending, with their sender, at the end.
 *
 * Threads: "spin"   running, rewriting its own 4 MiB region and counting;
 *          "mutex"  blocked in pthread_mutex_lock on a mutex main holds;
 *          "cond"   in pthread_cond_wait until main sets a flag;
 *          "sleep"  in nanosleep (1 s at a time);
 *          "spinN"  NSPIN more spinners (for scale).
 * Each thread sets its own name, sigaltstack, signal mask (blocks SIGUSR1 + a
 * per-thread signal), __thread value and records its TID, robust list head and
 * rseq registration.
 *
 * READY pid= threads= tids=a,b,c,...
 * On SIGUSR2 (main only): main unlocks the mutex, signals the condition, stops
 * the spinners and sleeper, joins every thread (pthread_join needs
 * clear_child_tid), and each thread checks, in itself:
 *   - gettid() equals the recorded TID (only when the PID did not change),
 *   - name, sigaltstack, signal mask, __thread value unchanged,
 *   - get_robust_list(0) unchanged, rseq still registered (re-registering the
 *     same area answers EBUSY), its memory region matches its counter.
 * VERIFY OK pid= threads= spins=   or   VERIFY FAIL pid= reason=
 */
#include "wl.h"

#include <pthread.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/rseq.h>

#define REGION (4UL << 20)
#define MAXT 2048

struct tstate {
    pthread_t th;
    char name[16];
    int kind; /* 0 spin, 1 mutex, 2 cond, 3 sleep */
    pid_t tid;
    int signo; /* blocked per thread */
    void *altstack;
    uint64_t robust_head;
    unsigned char *region;
    volatile uint64_t gen;
    volatile int started;
    char fail[256];
};

static struct tstate ts[MAXT];
static int nthreads;
static volatile int stop;
static pid_t orig_pid;
static __thread uint64_t tls_value;

static pthread_mutex_t held = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t cm = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int cond_flag;
static volatile sig_atomic_t got_usr2;
static volatile sig_atomic_t handled; /* "handlers": a signal nobody sent arrived */
static int pending_mode;               /* "pending" */

static void on_unexpected(int sig)
{
    (void)sig;
    handled++;
}
static volatile uint64_t churned;

static void *short_lived(void *arg)
{
    (void)arg;
    return (void *)(uintptr_t)syscall(SYS_gettid);
}

static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static void tfail(struct tstate *t, const char *what)
{
    size_t n = strlen(t->fail);
    snprintf(t->fail + n, sizeof(t->fail) - n, "%s%s:%s", n ? "," : "", t->name, what);
}

static void *rseq_area(void)
{
    if (__rseq_size == 0)
        return NULL;
    return (char *)__builtin_thread_pointer() + __rseq_offset;
}

static void fill_gen(struct tstate *t, uint64_t g)
{
    fill(t->region, REGION, (uint64_t)t->tid * 1000003u + g);
}

static void check_self(struct tstate *t)
{
    if (getpid() == orig_pid && (pid_t)syscall(SYS_gettid) != t->tid)
        tfail(t, "tid");
    char name[16] = {0};
    pthread_getname_np(pthread_self(), name, sizeof(name));
    if (strcmp(name, t->name))
        tfail(t, "name");
    stack_t ss;
    if (sigaltstack(NULL, &ss) || ss.ss_sp != t->altstack || ss.ss_size != 65536)
        tfail(t, "sigaltstack");
    sigset_t cur;
    pthread_sigmask(SIG_SETMASK, NULL, &cur);
    if (!sigismember(&cur, SIGUSR1) || !sigismember(&cur, t->signo) ||
        !sigismember(&cur, SIGUSR2))
        tfail(t, "sigmask");
    if (tls_value != (uint64_t)t->tid * 77u + 5)
        tfail(t, "tls");
    if (pending_mode) {
        sigset_t p;
        sigpending(&p);
        siginfo_t si;
        struct timespec zero = {0, 0};
        sigset_t one;
        sigemptyset(&one);
        sigaddset(&one, t->signo);
        if (!sigismember(&p, SIGUSR1) || !sigismember(&p, t->signo))
            tfail(t, "pending");
        else if (sigtimedwait(&one, &si, &zero) != t->signo || si.si_pid != orig_pid ||
                 (si.si_code != SI_TKILL && si.si_code != SI_USER)) /* tgkill's, by kernel */
            tfail(t, "pending_siginfo");
    }
    void *head = NULL;
    size_t len = 0;
    if (syscall(SYS_get_robust_list, 0, &head, &len) || (uint64_t)(uintptr_t)head != t->robust_head)
        tfail(t, "robust_list");
    void *rs = rseq_area();
    if (rs) {
        long r = syscall(334, rs, (unsigned)__rseq_size < 32 ? 32 : __rseq_size, 0, RSEQ_SIG);
        if (!(r == -1 && errno == EBUSY))
            tfail(t, "rseq_not_registered");
    }
    uint64_t g = t->gen;
    uint64_t h = hash_mem(t->region, REGION, 0);
    unsigned char *ref = malloc(REGION);
    fill(ref, REGION, (uint64_t)t->tid * 1000003u + g);
    if (h != hash_mem(ref, REGION, 0))
        tfail(t, "region");
    free(ref);
}

static void *thread_main(void *arg)
{
    struct tstate *t = arg;
    t->tid = (pid_t)syscall(SYS_gettid);
    prctl(PR_SET_NAME, t->name);
    tls_value = (uint64_t)t->tid * 77u + 5;
    stack_t ss = {.ss_sp = t->altstack, .ss_size = 65536, .ss_flags = 0};
    sigaltstack(&ss, NULL);
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGUSR1);
    sigaddset(&m, t->signo);
    pthread_sigmask(SIG_BLOCK, &m, NULL);
    void *head = NULL;
    size_t len = 0;
    syscall(SYS_get_robust_list, 0, &head, &len);
    t->robust_head = (uint64_t)(uintptr_t)head;
    if (pending_mode) {
        syscall(SYS_tgkill, getpid(), t->tid, SIGUSR1);
        syscall(SYS_tgkill, getpid(), t->tid, t->signo);
    }
    fill_gen(t, 0);
    t->started = 1;
    switch (t->kind) {
    case 0:
        while (!stop) {
            uint64_t g = t->gen + 1;
            fill_gen(t, g);
            t->gen = g;
        }
        break;
    case 1:
        pthread_mutex_lock(&held);
        pthread_mutex_unlock(&held);
        break;
    case 2:
        pthread_mutex_lock(&cm);
        while (!cond_flag)
            pthread_cond_wait(&cv, &cm);
        pthread_mutex_unlock(&cm);
        break;
    case 3:
        while (!stop) {
            struct timespec d = {1, 0};
            nanosleep(&d, NULL);
        }
        break;
    case 4:
        while (!stop) {
            pthread_t c;
            void *r = NULL;
            if (pthread_create(&c, NULL, short_lived, NULL) || pthread_join(c, &r) || !r) {
                tfail(t, "create_join");
                break;
            }
            churned++;
        }
        break;
    }
    check_self(t);
    return NULL;
}

static void add(const char *name, int kind)
{
    struct tstate *t = &ts[nthreads];
    snprintf(t->name, sizeof(t->name), "%s", name);
    t->kind = kind;
    t->signo = SIGRTMIN + 1 + nthreads % 20;
    t->altstack = malloc(65536);
    t->region = mmap(NULL, REGION, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    SETUP_CHECK(t->region != MAP_FAILED, "mmap");
    nthreads++;
}

int main(int argc, char **argv)
{
    int nspin = argc > 1 ? atoi(argv[1]) : 0;
    SETUP_CHECK(nspin >= 0 && nspin < MAXT - 8, "NSPIN");
    orig_pid = getpid();
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old); /* threads inherit SIGUSR2 blocked */
    pthread_mutex_lock(&held);
    add("spin", 0);
    add("mutex", 1);
    add("cond", 2);
    add("sleep", 3);
    int churn = argc > 2 && strcmp(argv[2], "churn") == 0;
    pending_mode = argc > 2 && strcmp(argv[2], "pending") == 0;
    if (argc > 2 && strcmp(argv[2], "blocked") == 0) {
        sigset_t b; /* the threads inherit it; main's own is sigsuspend's */
        sigemptyset(&b);
        sigaddset(&b, SIGURG);
        sigaddset(&b, SIGWINCH);
        sigaddset(&b, SIGCHLD);
        sigprocmask(SIG_BLOCK, &b, NULL);
    }
    if (argc > 2 && strcmp(argv[2], "handlers") == 0) {
        struct sigaction sa = {.sa_handler = on_unexpected, .sa_flags = SA_RESTART};
        SETUP_CHECK(sigaction(SIGURG, &sa, NULL) == 0 && sigaction(SIGWINCH, &sa, NULL) == 0 &&
                        sigaction(SIGCHLD, &sa, NULL) == 0,
                    "sigaction");
    }
    if (churn)
        add("churn", 4);
    for (int i = 0; i < nspin; i++) {
        char n[16];
        snprintf(n, sizeof(n), "spin%d", i);
        add(n, 0);
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    for (int i = 0; i < nthreads; i++)
        SETUP_CHECK(pthread_create(&ts[i].th, &attr, thread_main, &ts[i]) == 0,
                    "pthread_create");
    for (int i = 0; i < nthreads; i++)
        while (!ts[i].started)
            usleep(1000);
    /* wait until the mutex and cond threads are really blocked */
    usleep(100000);
    static char tids[MAXT * 8];
    size_t off = 0;
    for (int i = 0; i < nthreads && off < sizeof(tids) - 16; i++)
        off += (size_t)snprintf(tids + off, sizeof(tids) - off, "%s%d", i ? "," : "", ts[i].tid);
    say("READY pid=%d threads=%d tids=%s", (int)getpid(), nthreads + 1, tids);

    while (!got_usr2)
        sigsuspend(&old);
    /* sigsuspend gives back the thread's own mask: SIGUSR2 blocked, as before */
    sigset_t now;
    sigprocmask(SIG_SETMASK, NULL, &now);
    CHECK(sigismember(&now, SIGUSR2), "mask_after_sigsuspend_lost_SIGUSR2");

    /* Make sure the spinners are still making progress after the restore. */
    uint64_t g0 = ts[0].gen;
    double deadline = mono_now() + 30;
    while (ts[0].gen < g0 + 2 && mono_now() < deadline)
        usleep(1000);
    CHECK(ts[0].gen >= g0 + 2, "spinner stalled");
    uint64_t c0 = churned;
    deadline = mono_now() + 30;
    while (churn && churned < c0 + 10 && mono_now() < deadline)
        usleep(1000);
    CHECK(!churn || churned >= c0 + 10, "thread churn stalled");
    pthread_mutex_unlock(&held);
    pthread_mutex_lock(&cm);
    cond_flag = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&cm);
    stop = 1;
    uint64_t spins = 0;
    for (int i = 0; i < nthreads; i++) {
        struct timespec dl;
        clock_gettime(CLOCK_REALTIME, &dl);
        dl.tv_sec += 60;
        int r = pthread_timedjoin_np(ts[i].th, NULL, &dl);
        if (r) {
            fail("join_%s_%s", ts[i].name, strerror(r));
            continue;
        }
        if (ts[i].fail[0])
            fail("%s", ts[i].fail);
        if (ts[i].kind == 0)
            spins += ts[i].gen;
    }
    CHECK(!handled, "a_signal_nobody_sent_reached_a_handler");
    char extra[96];
    snprintf(extra, sizeof(extra), "threads=%d spins=%llu", nthreads + 1,
             (unsigned long long)spins);
    finish(extra);
}
