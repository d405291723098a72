/* pidfds: pidfds of every kind a process holds, checked from inside after a restore.
 *
 * usage: pidfds          (run in a scratch directory: helpers run in ./kids, so that
 *                         only the workload itself has the scratch directory as cwd)
 *        pidfds thread   (refused: a pidfd of one of its own threads, PIDFD_THREAD)
 * READY pid= outside= fd= kids=C1,C2,ZOMBIE   then waits in sigsuspend() until SIGUSR2, then checks and prints
 * VERIFY OK pid=  (exit 0)  or  VERIFY FAIL pid= reason=  (exit 1)
 *
 * Set up before READY:
 *   self      pidfd_open(getpid()), and a PIDFD_THREAD one of the leader (O_EXCL)
 *   c1        a child made with clone3(CLONE_PIDFD); its pidfd is in an epoll set
 *   c2        a child's pidfd_open(PIDFD_NONBLOCK); c2 holds a pidfd of its parent
 *   zombie    a child that exited with 42, not waited for; its pidfd taken before
 *   dead      a pidfd of a child that exited and was reaped (fdinfo Pid: -1)
 *   outside   a pidfd of a process outside the tree (double fork: the test, a
 *             subreaper, is its parent), printed as outside=
 * Checked after SIGUSR2 (the PIDs of the children may have changed: --new-pid):
 *   every pidfd's F_GETFL/F_GETFD as set up; self: Pid is getpid(), signal 0 works;
 *   c2: waitid(P_PIDFD) says EAGAIN while it runs (non-blocking), pidfd_send_signal
 *   SIGTERM, poll until readable, waitid: it exited 0 (its SIGTERM handler found its
 *   pidfd of the parent naming getppid() and signal 0 working); c1: not ready in epoll,
 *   SIGUSR1 through the pidfd, epoll reports it, blocking waitid: exited 7;
 *   zombie: waitid(P_PIDFD, WNOHANG) reaps exit status 42; dead: Pid -1, readable,
 *   ESRCH; outside: Pid is outside=, signal 0 works, waitid says ECHILD.
 */
#include "wl.h"

#include <linux/sched.h>
#include <poll.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/wait.h>

#ifndef PIDFD_NONBLOCK
#define PIDFD_NONBLOCK O_NONBLOCK
#endif
#ifndef PIDFD_THREAD
#define PIDFD_THREAD O_EXCL
#endif
#ifndef P_PIDFD
#define P_PIDFD 3
#endif

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static int pidfd_open(pid_t pid, unsigned flags)
{
    return (int)syscall(SYS_pidfd_open, pid, flags);
}

static int pidfd_signal(int fd, int sig)
{
    return (int)syscall(SYS_pidfd_send_signal, fd, sig, NULL, 0);
}

/* The `Pid:` line of an fd's fdinfo (0 if there is none). */
static long fdinfo_pid(int fd)
{
    char path[64], *buf;
    snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
    if (read_file(path, &buf) < 0)
        return 0;
    char *p = strstr(buf, "\nPid:");
    long v = p ? strtol(p + 5, NULL, 10) : 0;
    free(buf);
    return v;
}

/* ------------------------------------------------------------------ the children */

static int parent_fd = -1;

static void c1_usr1(int sig)
{
    (void)sig;
    _exit(7);
}

static void c2_term(int sig)
{
    (void)sig;
    int ok = fdinfo_pid(parent_fd) == (long)getppid() && pidfd_signal(parent_fd, 0) == 0;
    _exit(ok ? 0 : 3);
}

static void child_loop(void (*handler)(int), int sig) __attribute__((noreturn));
static void child_loop(void (*handler)(int), int sig)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = handler;
    sigaction(sig, &sa, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (;;)
        pause();
}

static void wait_zombie(pid_t pid)
{
    char path[64], *buf;
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    for (int i = 0; i < 5000; i++) {
        SETUP_CHECK(read_file(path, &buf) >= 0, "read zombie stat");
        char *p = strrchr(buf, ')');
        int z = p && p[2] == 'Z';
        free(buf);
        if (z)
            return;
        usleep(1000);
    }
    SETUP_CHECK(0, "the child did not become a zombie");
}

/* ------------------------------------------------------------------ set up */

enum { SELF, SELF_THREAD, C1, C2, ZOMBIE, DEAD, OUTSIDE, N };
static const char *names[N] = {"self", "self-thread", "c1", "c2", "zombie", "dead", "outside"};
static int fds[N], fl[N], fdfl[N];
static int ep;
static pid_t outside, kids[3];

static void setup(void)
{
    SETUP_CHECK(mkdir("kids", 0755) == 0 || errno == EEXIST, "mkdir kids");
    fds[SELF] = pidfd_open(getpid(), 0);
    fds[SELF_THREAD] = pidfd_open(getpid(), PIDFD_THREAD);
    SETUP_CHECK(fds[SELF] >= 0 && fds[SELF_THREAD] >= 0, "pidfd_open self");
    /* leave fd 0-2 alone; a plain pidfd moves to a number without close-on-exec */
    int plain = fcntl(fds[SELF], F_DUPFD, 40);
    SETUP_CHECK(plain == 40, "F_DUPFD");
    close(fds[SELF]);
    fds[SELF] = plain;

    /* c1: clone3 with CLONE_PIDFD */
    int c1fd = -1;
    struct clone_args args;
    memset(&args, 0, sizeof(args));
    args.flags = CLONE_PIDFD;
    args.pidfd = (uint64_t)(uintptr_t)&c1fd;
    args.exit_signal = SIGCHLD;
    long c1 = syscall(SYS_clone3, &args, sizeof(args));
    SETUP_CHECK(c1 >= 0, "clone3");
    if (c1 == 0) {
        SETUP_CHECK(chdir("kids") == 0, "chdir");
        child_loop(c1_usr1, SIGUSR1);
    }
    fds[C1] = c1fd;
    kids[0] = (pid_t)c1;
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0xC1};
    SETUP_CHECK(ep >= 0 && epoll_ctl(ep, EPOLL_CTL_ADD, c1fd, &ev) == 0, "epoll");

    /* c2: pidfd_open(PIDFD_NONBLOCK); it holds a pidfd of its parent */
    pid_t c2 = fork();
    SETUP_CHECK(c2 >= 0, "fork");
    if (c2 == 0) {
        SETUP_CHECK(chdir("kids") == 0, "chdir");
        parent_fd = pidfd_open(getppid(), 0);
        SETUP_CHECK(parent_fd >= 0, "pidfd_open parent");
        child_loop(c2_term, SIGTERM);
    }
    kids[1] = c2;
    fds[C2] = pidfd_open(c2, PIDFD_NONBLOCK);
    SETUP_CHECK(fds[C2] >= 0, "pidfd_open c2");

    /* zombie: exits 42, not waited for */
    pid_t z = fork();
    SETUP_CHECK(z >= 0, "fork");
    if (z == 0)
        _exit(42);
    kids[2] = z;
    fds[ZOMBIE] = pidfd_open(z, 0); /* a zombie still has its pidfd */
    SETUP_CHECK(fds[ZOMBIE] >= 0, "pidfd_open zombie");
    wait_zombie(z);

    /* dead: waited for */
    pid_t d = fork();
    SETUP_CHECK(d >= 0, "fork");
    if (d == 0)
        _exit(0);
    fds[DEAD] = pidfd_open(d, PIDFD_NONBLOCK);
    SETUP_CHECK(fds[DEAD] >= 0 && waitpid(d, NULL, 0) == d, "dead pidfd");

    /* outside: double fork, so the test (a subreaper) becomes its parent */
    int report[2];
    SETUP_CHECK(pipe(report) == 0, "pipe");
    pid_t mid = fork();
    SETUP_CHECK(mid >= 0, "fork");
    if (mid == 0) {
        pid_t peer = fork();
        if (peer == 0) {
            /* its own session: the workload's PID (its session and group id) must be
               free for the restore; none of the workload's fds either */
            setsid();
            close_range(3, ~0U, 0);
            if (chdir("kids") != 0)
                _exit(1);
            for (;;)
                pause();
        }
        _exit(write(report[1], &peer, sizeof(peer)) == sizeof(peer) ? 0 : 1);
    }
    close(report[1]);
    SETUP_CHECK(read(report[0], &outside, sizeof(outside)) == sizeof(outside), "peer pid");
    close(report[0]);
    SETUP_CHECK(waitpid(mid, NULL, 0) == mid, "waitpid");
    fds[OUTSIDE] = pidfd_open(outside, 0);
    SETUP_CHECK(fds[OUTSIDE] >= 0, "pidfd_open outside");

    for (int i = 0; i < N; i++) {
        fl[i] = fcntl(fds[i], F_GETFL);
        fdfl[i] = fcntl(fds[i], F_GETFD);
    }
}

/* ------------------------------------------------------------------ verify */

static void verify(void)
{
    for (int i = 0; i < N; i++) {
        int f = fcntl(fds[i], F_GETFL), d = fcntl(fds[i], F_GETFD);
        CHECK(f == fl[i], "%s: F_GETFL %o, want %o", names[i], f, fl[i]);
        CHECK(d == fdfl[i], "%s: F_GETFD %d, want %d", names[i], d, fdfl[i]);
    }
    CHECK(fdinfo_pid(fds[SELF]) == getpid(), "self: Pid %ld", fdinfo_pid(fds[SELF]));
    CHECK(fdinfo_pid(fds[SELF_THREAD]) == getpid(), "self-thread: Pid %ld",
          fdinfo_pid(fds[SELF_THREAD]));
    CHECK(pidfd_signal(fds[SELF], 0) == 0, "self: signal 0: %s", strerror(errno));

    /* c2: non-blocking waitid, then SIGTERM through the pidfd */
    siginfo_t si;
    memset(&si, 0, sizeof(si));
    long c2 = fdinfo_pid(fds[C2]);
    CHECK(c2 > 0, "c2: Pid %ld", c2);
    int r = waitid(P_PIDFD, fds[C2], &si, WEXITED);
    CHECK(r == -1 && errno == EAGAIN, "c2: waitid on a running child gave %d (%s), not EAGAIN",
          r, strerror(errno));
    CHECK(pidfd_signal(fds[C2], SIGTERM) == 0, "c2: SIGTERM: %s", strerror(errno));
    struct pollfd pfd = {.fd = fds[C2], .events = POLLIN};
    CHECK(poll(&pfd, 1, 10000) == 1 && (pfd.revents & POLLIN), "c2: not readable after exit");
    memset(&si, 0, sizeof(si));
    r = waitid(P_PIDFD, fds[C2], &si, WEXITED);
    CHECK(r == 0 && si.si_code == CLD_EXITED && si.si_status == 0 && si.si_pid == c2,
          "c2: waitid %d code %d status %d pid %d (want exited 0, pid %ld: 3 = its pidfd of "
          "the parent was wrong)",
          r, si.si_code, si.si_status, (int)si.si_pid, c2);

    /* c1: epoll on the pidfd, SIGUSR1 through it, blocking waitid */
    struct epoll_event ev;
    CHECK(epoll_wait(ep, &ev, 1, 0) == 0, "c1: ready in epoll while it runs");
    long c1 = fdinfo_pid(fds[C1]);
    CHECK(pidfd_signal(fds[C1], SIGUSR1) == 0, "c1: SIGUSR1: %s", strerror(errno));
    CHECK(epoll_wait(ep, &ev, 1, 10000) == 1 && ev.data.u64 == 0xC1, "c1: no epoll event");
    memset(&si, 0, sizeof(si));
    r = waitid(P_PIDFD, fds[C1], &si, WEXITED);
    CHECK(r == 0 && si.si_code == CLD_EXITED && si.si_status == 7 && si.si_pid == c1,
          "c1: waitid %d code %d status %d pid %d (want exited 7, pid %ld)", r, si.si_code,
          si.si_status, (int)si.si_pid, c1);

    /* zombie: its status is there at once */
    long z = fdinfo_pid(fds[ZOMBIE]);
    memset(&si, 0, sizeof(si));
    r = waitid(P_PIDFD, fds[ZOMBIE], &si, WEXITED | WNOHANG);
    CHECK(r == 0 && si.si_code == CLD_EXITED && si.si_status == 42 && si.si_pid == z,
          "zombie: waitid %d code %d status %d pid %d (want exited 42, pid %ld)", r,
          si.si_code, si.si_status, (int)si.si_pid, z);

    /* dead */
    CHECK(fdinfo_pid(fds[DEAD]) == -1, "dead: Pid %ld", fdinfo_pid(fds[DEAD]));
    pfd.fd = fds[DEAD];
    CHECK(poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLIN), "dead: not readable");
    CHECK(pidfd_signal(fds[DEAD], 0) == -1 && errno == ESRCH, "dead: signal 0 did not fail");

    /* outside */
    CHECK(fdinfo_pid(fds[OUTSIDE]) == outside, "outside: Pid %ld, want %d",
          fdinfo_pid(fds[OUTSIDE]), (int)outside);
    CHECK(pidfd_signal(fds[OUTSIDE], 0) == 0, "outside: signal 0: %s", strerror(errno));
    r = waitid(P_PIDFD, fds[OUTSIDE], &si, WEXITED | WNOHANG);
    CHECK(r == -1 && errno == ECHILD, "outside: waitid gave %d, not ECHILD", r);
}

/* ------------------------------------------------------------------ refused */

static volatile pid_t thread_tid;

static void *idle(void *arg)
{
    (void)arg;
    thread_tid = gettid();
    for (;;)
        pause();
    return NULL;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "all";
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    int refused = -1;
    if (strcmp(mode, "thread") == 0) {
        pthread_t t;
        SETUP_CHECK(pthread_create(&t, NULL, idle, NULL) == 0, "pthread_create");
        while (!thread_tid)
            usleep(1000);
        refused = pidfd_open(thread_tid, PIDFD_THREAD);
        SETUP_CHECK(refused >= 0, "pidfd_open thread");
    } else {
        setup();
    }
    say("READY pid=%d outside=%d fd=%d kids=%d,%d,%d", (int)getpid(), (int)outside, refused,
        (int)kids[0], (int)kids[1], (int)kids[2]);
    while (!got_usr2)
        sigsuspend(&old);
    if (refused < 0)
        verify();
    else
        CHECK(fdinfo_pid(refused) == thread_tid, "the thread pidfd changed");
    finish("");
}
