/* epolltree: one epoll shared by a parent and its child (inherited across fork),
 * whose registrations name files that only one of the two still holds.
 *
 * usage: epolltree          (the case redis' BGSAVE child makes, and its converse)
 *        epolltree orphan   (refused: a registered file only a process without the
 *                            epoll holds)
 * READY pid= child=   then waits in sigsuspend() until SIGUSR2, checks and prints
 * VERIFY OK pid=  (exit 0)  or  VERIFY FAIL pid= reason=  (exit 1)
 *
 * Set up before READY (EP is the epoll, fd 10):
 *   A   an eventfd at fd 11, registered by the parent (data 0xA); the child closes
 *       its fd 11 and puts /dev/null there: only the parent holds (11, A)
 *   C   an eventfd the child makes at fd 12 and registers in the shared epoll (data
 *       0xC): only the child holds it (the parent's fd 12 is /dev/null)
 * Checked after SIGUSR2: the child's fd 11 and the parent's fd 12 are /dev/null; EP
 *   is quiet; A written: EP reports exactly 0xA (read back); the child writes C (a
 *   pipe tells it to): EP reports exactly 0xC; the child reads C back, EP is quiet
 *   again, the child exits 0 (it checked its own fds too).
 * orphan: the parent registers an eventfd X, forks; the parent closes X, the child
 *   closes the epoll: X is held only by the child, the epoll only by the parent.
 */
#include "wl.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/wait.h>

#define EP 10
#define FD_A 11
#define FD_C 12

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static void put(int fd, int at)
{
    SETUP_CHECK(fd >= 0, "open");
    if (fd != at) {
        SETUP_CHECK(dup2(fd, at) == at, "dup2");
        close(fd);
    }
}

static int is_devnull(int fd)
{
    struct stat a, b;
    return fstat(fd, &a) == 0 && stat("/dev/null", &b) == 0 && a.st_rdev == b.st_rdev &&
           S_ISCHR(a.st_mode);
}

/* the data of the events EP reports now (timeout ms), up to 4; their number */
static int ready(uint64_t *data, int timeout)
{
    struct epoll_event ev[4];
    int n = epoll_wait(EP, ev, 4, timeout);
    for (int i = 0; i < n; i++)
        data[i] = ev[i].data.u64;
    return n;
}

static void add(int fd, uint64_t data)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = data};
    SETUP_CHECK(epoll_ctl(EP, EPOLL_CTL_ADD, fd, &ev) == 0, "epoll_ctl");
}

static void child_main(int go, int done)
{
    close(FD_A);
    put(open("/dev/null", O_RDONLY), FD_A);
    put(eventfd(0, EFD_NONBLOCK), FD_C);
    add(FD_C, 0xC);
    char c = 'r';
    SETUP_CHECK(write(done, &c, 1) == 1, "child ready");
    if (read(go, &c, 1) != 1) /* the parent's verification starts */
        _exit(3);
    uint64_t one = 1;
    if (!is_devnull(FD_A) || write(FD_C, &one, 8) != 8)
        _exit(4);
    SETUP_CHECK(write(done, &c, 1) == 1, "child wrote");
    if (read(go, &c, 1) != 1)
        _exit(5);
    uint64_t got;
    _exit(read(FD_C, &got, 8) == 8 && got == 1 ? 0 : 6);
}

static int orphan(void)
{
    put(epoll_create1(0), EP);
    put(eventfd(0, 0), FD_A);
    add(FD_A, 0xA);
    pid_t child = fork();
    SETUP_CHECK(child >= 0, "fork");
    if (child == 0) {
        close(EP);
        for (;;)
            pause();
    }
    close(FD_A);
    say("READY pid=%d child=%d", (int)getpid(), (int)child);
    for (;;)
        pause();
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "orphan") == 0)
        return orphan();
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    put(epoll_create1(EPOLL_CLOEXEC), EP);
    put(eventfd(0, EFD_NONBLOCK), FD_A);
    add(FD_A, 0xA);
    int go[2], done[2];
    SETUP_CHECK(pipe(go) == 0 && pipe(done) == 0, "pipe");
    pid_t child = fork();
    SETUP_CHECK(child >= 0, "fork");
    if (child == 0) {
        close(go[1]);
        close(done[0]);
        child_main(go[0], done[1]);
    }
    close(go[0]);
    close(done[1]);
    put(open("/dev/null", O_RDONLY), FD_C);
    char c;
    SETUP_CHECK(read(done[0], &c, 1) == 1, "child setup");
    say("READY pid=%d child=%d", (int)getpid(), (int)child);
    while (!got_usr2)
        sigsuspend(&old);

    uint64_t data[4], one = 1, got;
    int n;
    CHECK(is_devnull(FD_C), "parent fd 12 is not /dev/null");
    CHECK((n = ready(data, 0)) == 0, "epoll ready before any write: %d events", n);
    CHECK(write(FD_A, &one, 8) == 8, "write A: %s", strerror(errno));
    n = ready(data, 1000);
    CHECK(n == 1 && data[0] == 0xA, "after A: %d events, first %#llx", n,
          n > 0 ? (unsigned long long)data[0] : 0ULL);
    CHECK(read(FD_A, &got, 8) == 8 && got == 1, "read A back");
    c = 'g';
    CHECK(write(go[1], &c, 1) == 1, "tell the child to write C");
    CHECK(read(done[0], &c, 1) == 1, "the child wrote C");
    n = ready(data, 1000);
    CHECK(n == 1 && data[0] == 0xC, "after C: %d events, first %#llx", n,
          n > 0 ? (unsigned long long)data[0] : 0ULL);
    CHECK(write(go[1], &c, 1) == 1, "tell the child to read C");
    int status;
    CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0,
          "child exited with status %#x", status);
    CHECK((n = ready(data, 0)) == 0, "epoll ready at the end: %d events", n);
    finish("");
}
