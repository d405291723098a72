/* signals: signal dispositions, mask, pending queue, alt stack, interval and POSIX
 * timers, rseq, robust list and tid address, checked by the process itself.
 *
 * usage: signals
 * READY pid= tick_timer= far_timer= gone_timer= rseq=
 *   then loops on pause() (a 50 ms POSIX timer wakes it) until SIGUSR2, then prints
 * VERIFY OK pid= ticks=  (exit 0)  or  VERIFY FAIL pid= ... reason=... (exit 1)
 *
 * Checked after SIGUSR2, in this order:
 *  - the raw kernel sigaction (handler, flags, restorer, mask) of every signal 1..64
 *    equals what it was at READY: handlers with SA_SIGINFO / SA_RESTART / SA_ONSTACK /
 *    SA_NODEFER / SA_RESETHAND and masks, SIGPIPE ignored, SIGXFSZ/SIGURG/SIGWINCH default
 *  - the blocked mask is unchanged; sigaltstack is unchanged
 *  - get_robust_list(0), PR_GET_TID_ADDRESS unchanged; glibc's rseq area is still
 *    registered (re-registering gives EBUSY) and its cpu_id >= 0
 *  - ITIMER_REAL shrank but is > 0 (interval kept); ITIMER_VIRTUAL/PROF in
 *    (0, saved + 50 ms] (setting a CPU-time itimer rounds it up by a tick)
 *  - POSIX timer ids: the two live ids answer timer_gettime (periodic interval kept,
 *    the far one-shot has time left), the deleted id does not exist
 *  - SIGUSR1 (queued with sigqueue, value 0x5eed1234) and SIGRTMIN+2 (queued twice,
 *    values 1 then 2) are still pending; unblocking fires the handlers with those values
 *  - SIGHUP (SA_ONSTACK) runs on the alt stack; SIGINT (SA_NODEFER) nests; SIGQUIT
 *    (SA_RESETHAND) fires once and resets to SIG_DFL; SIGTERM's handler runs with its
 *    sa_mask blocked; SIGPIPE stays ignored
 *  - the periodic POSIX timer keeps ticking (>= 5 more ticks within 30 s)
 */
#include "wl.h"

#include <sched.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/rseq.h>
#include <sys/time.h>

struct ksigaction {
    uintptr_t handler;
    unsigned long flags;
    uintptr_t restorer;
    uint64_t mask;
};

static struct ksigaction saved_act[65];
static sigset_t saved_mask;
static stack_t saved_ss;
static void *saved_robust_head;
static size_t saved_robust_len;
static uintptr_t saved_tid_addr;
static struct itimerval saved_it[3];
static timer_t tick_timer, far_timer, gone_timer;
static struct itimerspec saved_far;

static volatile sig_atomic_t got_usr2, ticks, bad_tick_value;
static volatile sig_atomic_t usr1_count, usr1_code, rt_count, hup_on_alt, hup_count;
static volatile sig_atomic_t int_depth, int_max_depth, quit_count, term_count, term_mask_ok;
static volatile sig_atomic_t stray_timer_signals;
static volatile int usr1_value, rt_values[4];
static unsigned char *altstack;
static const size_t altstack_len = 64 * 1024;

static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static void on_tick(int sig, siginfo_t *si, void *uc)
{
    (void)sig;
    (void)uc;
    if (si->si_value.sival_int != 77)
        bad_tick_value = 1;
    ticks++;
}

static void on_usr1(int sig, siginfo_t *si, void *uc)
{
    (void)sig;
    (void)uc;
    usr1_count++;
    usr1_code = si->si_code;
    usr1_value = si->si_value.sival_int;
}

static void on_rt(int sig, siginfo_t *si, void *uc)
{
    (void)sig;
    (void)uc;
    if (rt_count < 4)
        rt_values[rt_count] = si->si_value.sival_int;
    rt_count++;
}

static void on_hup(int sig, siginfo_t *si, void *uc)
{
    (void)sig;
    (void)si;
    (void)uc;
    volatile char here;
    hup_count++;
    hup_on_alt = (unsigned char *)&here >= altstack && (unsigned char *)&here < altstack + altstack_len;
}

static void on_int(int sig)
{
    int_depth++;
    if (int_depth > int_max_depth)
        int_max_depth = int_depth;
    if (int_depth == 1)
        raise(sig); /* SA_NODEFER: delivered right here, nested */
    int_depth--;
}

static void on_quit(int sig)
{
    (void)sig;
    quit_count++;
}

static void on_term(int sig)
{
    sigset_t cur;
    sigprocmask(SIG_BLOCK, NULL, &cur);
    term_mask_ok = sigismember(&cur, SIGCHLD) && sigismember(&cur, SIGRTMIN + 5) &&
                   sigismember(&cur, sig);
    term_count++;
}

static void on_stray(int sig)
{
    (void)sig;
    stray_timer_signals++;
}

static void set_action(int sig, void *handler, int flags, const int *mask_sigs)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    if (flags & SA_SIGINFO)
        sa.sa_sigaction = handler;
    else
        sa.sa_handler = handler;
    sa.sa_flags = flags;
    sigemptyset(&sa.sa_mask);
    for (; mask_sigs && *mask_sigs; mask_sigs++)
        sigaddset(&sa.sa_mask, *mask_sigs);
    SETUP_CHECK(sigaction(sig, &sa, NULL) == 0, "sigaction");
}

static int raw_sigaction(int sig, struct ksigaction *out)
{
    return (int)syscall(SYS_rt_sigaction, sig, NULL, out, 8);
}

static void *rseq_area(void)
{
    return (char *)__builtin_thread_pointer() + __rseq_offset;
}

static timer_t make_timer(clockid_t clk, int sig, int value)
{
    struct sigevent sev;
    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_SIGNAL;
    sev.sigev_signo = sig;
    sev.sigev_value.sival_int = value;
    timer_t t;
    SETUP_CHECK(timer_create(clk, &sev, &t) == 0, "timer_create");
    return t;
}

static void verify(void)
{
    /* dispositions, mask, alt stack: before anything fires */
    for (int sig = 1; sig <= 64; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP)
            continue;
        struct ksigaction now;
        if (raw_sigaction(sig, &now) != 0) {
            fail("rt_sigaction(%d) query failed", sig);
            continue;
        }
        struct ksigaction *s = &saved_act[sig];
        CHECK(now.handler == s->handler && now.flags == s->flags && now.restorer == s->restorer &&
                  now.mask == s->mask,
              "sigaction(%d) handler %lx flags %lx mask %llx, want %lx %lx %llx", sig,
              (unsigned long)now.handler, now.flags, (unsigned long long)now.mask,
              (unsigned long)s->handler, s->flags, (unsigned long long)s->mask);
    }
    sigset_t cur;
    sigprocmask(SIG_BLOCK, NULL, &cur);
    for (int sig = 1; sig <= 64; sig++) {
        if (sig == 32 || sig == 33)
            continue;
        CHECK(sigismember(&cur, sig) == sigismember(&saved_mask, sig),
              "signal %d blocked=%d, want %d", sig, sigismember(&cur, sig),
              sigismember(&saved_mask, sig));
    }
    stack_t ss;
    sigaltstack(NULL, &ss);
    CHECK(ss.ss_sp == saved_ss.ss_sp && ss.ss_size == saved_ss.ss_size &&
              ss.ss_flags == saved_ss.ss_flags,
          "sigaltstack %p/%zu/%d, want %p/%zu/%d", ss.ss_sp, ss.ss_size, ss.ss_flags,
          saved_ss.ss_sp, saved_ss.ss_size, saved_ss.ss_flags);

    /* robust list, tid address, rseq */
    void *head = NULL;
    size_t len = 0;
    syscall(SYS_get_robust_list, 0, &head, &len);
    CHECK(head == saved_robust_head && len == saved_robust_len, "robust list %p/%zu want %p/%zu",
          head, len, saved_robust_head, saved_robust_len);
    uintptr_t tid_addr = 0;
    prctl(PR_GET_TID_ADDRESS, &tid_addr);
    CHECK(tid_addr == saved_tid_addr, "tid address %lx want %lx", (unsigned long)tid_addr,
          (unsigned long)saved_tid_addr);
    if (__rseq_size > 0) {
        unsigned int rlen = __rseq_size < 32 ? 32 : __rseq_size;
        long r = syscall(SYS_rseq, rseq_area(), rlen, 0, RSEQ_SIG);
        CHECK(r == -1 && errno == EBUSY,
              "rseq area not registered after restore (re-register gave %ld errno %d)", r, errno);
        sched_yield();
        volatile struct rseq *rs = rseq_area();
        CHECK((int)rs->cpu_id >= 0, "rseq cpu_id %d", (int)rs->cpu_id);
    }

    /* interval timers */
    struct itimerval it;
    getitimer(ITIMER_REAL, &it);
    long long now_us = it.it_value.tv_sec * 1000000LL + it.it_value.tv_usec;
    long long was_us = saved_it[0].it_value.tv_sec * 1000000LL + saved_it[0].it_value.tv_usec;
    CHECK(now_us > 0 && now_us < was_us, "ITIMER_REAL remaining %lld us, was %lld", now_us,
          was_us);
    CHECK(it.it_interval.tv_sec == saved_it[0].it_interval.tv_sec, "ITIMER_REAL interval lost");
    for (int which = ITIMER_VIRTUAL; which <= ITIMER_PROF; which++) {
        getitimer(which, &it);
        now_us = it.it_value.tv_sec * 1000000LL + it.it_value.tv_usec;
        was_us = saved_it[which].it_value.tv_sec * 1000000LL + saved_it[which].it_value.tv_usec;
        /* setitimer of a CPU-time timer adds one tick (TICK_NSEC) to the value, so a
         * restored timer may read a few ms more than the one saved: allow 50 ms */
        CHECK(now_us > 0 && now_us <= was_us + 50000, "itimer %d remaining %lld us, was %lld",
              which, now_us, was_us);
    }

    /* POSIX timers by their saved ids */
    struct itimerspec ts;
    CHECK(timer_gettime(tick_timer, &ts) == 0, "timer_gettime(tick id %ld): %s",
          (long)(intptr_t)tick_timer, strerror(errno));
    CHECK(ts.it_interval.tv_nsec == 50000000 && ts.it_interval.tv_sec == 0,
          "tick timer interval %ld.%09ld", (long)ts.it_interval.tv_sec, ts.it_interval.tv_nsec);
    CHECK(timer_gettime(far_timer, &ts) == 0, "timer_gettime(far id %ld): %s",
          (long)(intptr_t)far_timer, strerror(errno));
    CHECK(ts.it_value.tv_sec > 0 && ts.it_value.tv_sec <= saved_far.it_value.tv_sec,
          "far timer remaining %ld s, was %ld", (long)ts.it_value.tv_sec,
          (long)saved_far.it_value.tv_sec);
    errno = 0;
    CHECK(timer_gettime(gone_timer, &ts) == -1 && errno == EINVAL,
          "deleted timer id %ld exists after restore", (long)(intptr_t)gone_timer);

    /* pending queued signals, then let them in */
    sigset_t pend;
    sigpending(&pend);
    CHECK(sigismember(&pend, SIGUSR1), "queued SIGUSR1 no longer pending");
    CHECK(sigismember(&pend, SIGRTMIN + 2), "queued SIGRTMIN+2 no longer pending");
    sigset_t un;
    sigemptyset(&un);
    sigaddset(&un, SIGUSR1);
    sigaddset(&un, SIGRTMIN + 2);
    sigprocmask(SIG_UNBLOCK, &un, NULL);
    CHECK(usr1_count == 1, "SIGUSR1 handler ran %d times", (int)usr1_count);
    CHECK(usr1_code == SI_QUEUE && usr1_value == 0x5eed1234, "SIGUSR1 si_code %d value %x",
          (int)usr1_code, usr1_value);
    CHECK(rt_count == 2 && rt_values[0] == 1 && rt_values[1] == 2,
          "SIGRTMIN+2 ran %d times values %d,%d (want 2 times 1,2)", (int)rt_count, rt_values[0],
          rt_values[1]);

    /* handlers with flags */
    raise(SIGHUP);
    CHECK(hup_count == 1 && hup_on_alt, "SA_ONSTACK handler count %d on alt stack %d",
          (int)hup_count, (int)hup_on_alt);
    raise(SIGINT);
    CHECK(int_max_depth == 2, "SA_NODEFER handler nested depth %d", (int)int_max_depth);
    raise(SIGQUIT);
    struct ksigaction q;
    raw_sigaction(SIGQUIT, &q);
    CHECK(quit_count == 1 && q.handler == (uintptr_t)SIG_DFL,
          "SA_RESETHAND: count %d, handler after %lx", (int)quit_count, (unsigned long)q.handler);
    raise(SIGTERM);
    CHECK(term_count == 1 && term_mask_ok, "SIGTERM handler count %d sa_mask honoured %d",
          (int)term_count, (int)term_mask_ok);
    raise(SIGPIPE); /* ignored: we are still here */

    /* the periodic timer keeps ticking */
    int start = ticks;
    double deadline = mono_now() + 30;
    while (ticks < start + 5 && mono_now() < deadline) {
        struct timespec d = {0, 10000000};
        nanosleep(&d, NULL);
    }
    CHECK(ticks >= start + 5, "POSIX timer stopped ticking (%d -> %d)", start, (int)ticks);
    CHECK(!bad_tick_value, "timer signal carried a wrong sigev_value");
    CHECK(stray_timer_signals == 0, "%d itimer/far timer signals fired", (int)stray_timer_signals);

    char extra[64];
    snprintf(extra, sizeof(extra), "ticks=%d", (int)ticks);
    finish(extra);
}

int main(void)
{
    SETUP_CHECK(prctl(PR_SET_NAME, "cksig") == 0, "PR_SET_NAME");

    altstack = mmap(NULL, altstack_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
                    0);
    SETUP_CHECK(altstack != MAP_FAILED, "mmap altstack");
    stack_t ss = {.ss_sp = altstack, .ss_size = altstack_len, .ss_flags = 0};
    SETUP_CHECK(sigaltstack(&ss, NULL) == 0, "sigaltstack");

    static const int usr1_mask[] = {SIGWINCH, 0};
    static const int term_mask[] = {SIGCHLD, 0};
    set_action(SIGUSR2, on_usr2, 0, NULL);
    set_action(SIGUSR1, on_usr1, SA_SIGINFO | SA_RESTART, usr1_mask);
    set_action(SIGRTMIN + 2, on_rt, SA_SIGINFO, NULL);
    set_action(SIGRTMIN + 3, on_tick, SA_SIGINFO | SA_RESTART, NULL);
    set_action(SIGHUP, on_hup, SA_SIGINFO | SA_ONSTACK, NULL);
    set_action(SIGINT, on_int, SA_NODEFER, NULL);
    set_action(SIGQUIT, on_quit, SA_RESETHAND | SA_RESTART, NULL);
    set_action(SIGTERM, on_term, 0, term_mask);
    {
        /* SIGRTMIN+5 in SIGTERM's mask too (not a constant: SIGRTMIN is a call) */
        struct sigaction sa;
        sigaction(SIGTERM, NULL, &sa);
        sigaddset(&sa.sa_mask, SIGRTMIN + 5);
        SETUP_CHECK(sigaction(SIGTERM, &sa, NULL) == 0, "sigaction SIGTERM");
    }
    set_action(SIGALRM, on_stray, 0, NULL);
    set_action(SIGVTALRM, on_stray, 0, NULL);
    set_action(SIGPROF, on_stray, 0, NULL);
    set_action(SIGRTMIN + 4, on_stray, 0, NULL);
    SETUP_CHECK(signal(SIGPIPE, SIG_IGN) != SIG_ERR, "SIG_IGN SIGPIPE");

    /* blocked mask, and signals queued while blocked */
    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    sigaddset(&block, SIGRTMIN + 2);
    sigaddset(&block, SIGWINCH);
    sigaddset(&block, SIGTTOU);
    SETUP_CHECK(sigprocmask(SIG_BLOCK, &block, NULL) == 0, "sigprocmask");
    union sigval v = {.sival_int = 0x5eed1234};
    SETUP_CHECK(sigqueue(getpid(), SIGUSR1, v) == 0, "sigqueue USR1");
    v.sival_int = 1;
    SETUP_CHECK(sigqueue(getpid(), SIGRTMIN + 2, v) == 0, "sigqueue RT 1");
    v.sival_int = 2;
    SETUP_CHECK(sigqueue(getpid(), SIGRTMIN + 2, v) == 0, "sigqueue RT 2");

    /* interval timers */
    struct itimerval it = {.it_interval = {500, 0}, .it_value = {1000, 0}};
    SETUP_CHECK(setitimer(ITIMER_REAL, &it, NULL) == 0, "ITIMER_REAL");
    it = (struct itimerval){.it_interval = {0, 0}, .it_value = {500, 0}};
    SETUP_CHECK(setitimer(ITIMER_VIRTUAL, &it, NULL) == 0, "ITIMER_VIRTUAL");
    it = (struct itimerval){.it_interval = {0, 0}, .it_value = {600, 0}};
    SETUP_CHECK(setitimer(ITIMER_PROF, &it, NULL) == 0, "ITIMER_PROF");

    /* POSIX timers; the deleted one leaves a gap in the ids */
    timer_t dummy = make_timer(CLOCK_MONOTONIC, SIGRTMIN + 4, 0);
    tick_timer = make_timer(CLOCK_MONOTONIC, SIGRTMIN + 3, 77);
    gone_timer = make_timer(CLOCK_REALTIME, SIGRTMIN + 4, 0);
    far_timer = make_timer(CLOCK_REALTIME, SIGRTMIN + 4, 5);
    (void)dummy;
    SETUP_CHECK(timer_delete(gone_timer) == 0, "timer_delete");
    struct itimerspec per = {.it_interval = {0, 50000000}, .it_value = {0, 50000000}};
    SETUP_CHECK(timer_settime(tick_timer, 0, &per, NULL) == 0, "timer_settime tick");
    struct itimerspec far = {.it_interval = {0, 0}, .it_value = {2000, 0}};
    SETUP_CHECK(timer_settime(far_timer, 0, &far, NULL) == 0, "timer_settime far");

    /* rseq must be live now (glibc registers it at start-up) */
    if (__rseq_size > 0) {
        sched_yield();
        volatile struct rseq *rs = rseq_area();
        SETUP_CHECK((int)rs->cpu_id >= 0, "rseq cpu_id before dump");
    }

    /* snapshot of everything verify() compares */
    for (int sig = 1; sig <= 64; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            SETUP_CHECK(raw_sigaction(sig, &saved_act[sig]) == 0, "rt_sigaction query");
    sigprocmask(SIG_BLOCK, NULL, &saved_mask);
    sigaltstack(NULL, &saved_ss);
    syscall(SYS_get_robust_list, 0, &saved_robust_head, &saved_robust_len);
    SETUP_CHECK(prctl(PR_GET_TID_ADDRESS, &saved_tid_addr) == 0, "PR_GET_TID_ADDRESS");
    for (int which = 0; which < 3; which++)
        getitimer(which, &saved_it[which]);
    timer_gettime(far_timer, &saved_far);

    say("READY pid=%d tick_timer=%ld far_timer=%ld gone_timer=%ld rseq=%u", (int)getpid(),
        (long)(intptr_t)tick_timer, (long)(intptr_t)far_timer, (long)(intptr_t)gone_timer,
        __rseq_size);
    while (!got_usr2)
        pause();
    verify();
}
