/* fdstate: state that lives on an open file description or an fd table rather than in
 * the object behind it — SIGIO ownership, shared fd tables, a sealed executable memfd.
 *
 * usage: fdstate MODE
 *   async       O_ASYNC fds with owners: a pipe owned by this process (F_SETOWN_EX
 *               F_OWNER_PID) with F_SETSIG = SIGRTMIN+1, a socketpair end owned by its
 *               process group (F_SETOWN -pgid, plain SIGIO), a pipe owned by the main
 *               thread (F_OWNER_TID) with F_SETSIG = SIGRTMIN+3; both signals blocked.
 *               Verify: owners (mapped to the PID the process has now), F_GETSIG,
 *               O_ASYNC, and that a write to each delivers its signal with si_fd.
 *   memfdexec   a memfd holding a copy of /bin/true, sealed (SEAL|SHRINK|GROW|WRITE),
 *               with its memfd_create fd, an O_PATH fd (runc's pattern) and a read-only
 *               shared mapping; a second, unsealed one exec'd while a writable shared
 *               mapping of it exists. Verify: F_GET_SEALS, content, and that fork +
 *               execveat(fd, "", AT_EMPTY_PATH) of each exits 0.
 *   sharedfiles a child made by clone(CLONE_FILES) shares this process's fd table.
 *               Verify (after SIGUSR2): an fd the parent opens now is read by the
 *               child, one the child opens is seen by the parent, the child exits 0.
 *   sharedsibling  (refused) a child forks a grandchild with CLONE_PARENT|CLONE_FILES:
 *               it shares its creator's table but its parent is the root.
 * READY pid= [child=] ...   then waits in sigsuspend() until SIGUSR2, checks, and
 * prints VERIFY OK pid= (exit 0) or VERIFY FAIL pid= reason= (exit 1)
 */
#include "wl.h"

#include <sched.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>

#ifndef F_SETSIG
#define F_SETSIG 10
#define F_GETSIG 11
#endif
#ifndef F_ADD_SEALS
#define F_ADD_SEALS 1033
#define F_GET_SEALS 1034
#define F_SEAL_SEAL 0x0001
#define F_SEAL_SHRINK 0x0002
#define F_SEAL_GROW 0x0004
#define F_SEAL_WRITE 0x0008
#endif

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

/* ------------------------------------------------------------------ async */

static int ap[2], as[2], at[2];

static void own(int fd, int type, pid_t pid)
{
    struct f_owner_ex o = {.type = type, .pid = pid};
    SETUP_CHECK(fcntl(fd, F_SETOWN_EX, &o) == 0, "F_SETOWN_EX");
}

static void setup_async(void)
{
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGRTMIN + 1);
    sigaddset(&m, SIGRTMIN + 3);
    sigaddset(&m, SIGIO);
    sigprocmask(SIG_BLOCK, &m, NULL);
    SETUP_CHECK(pipe(ap) == 0, "pipe");
    own(ap[0], F_OWNER_PID, getpid());
    SETUP_CHECK(fcntl(ap[0], F_SETSIG, SIGRTMIN + 1) == 0, "F_SETSIG");
    SETUP_CHECK(fcntl(ap[0], F_SETFL, O_ASYNC | O_NONBLOCK) == 0, "F_SETFL O_ASYNC");
    SETUP_CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, as) == 0, "socketpair");
    SETUP_CHECK(fcntl(as[0], F_SETOWN, -getpgrp()) == 0, "F_SETOWN -pgid");
    SETUP_CHECK(fcntl(as[0], F_SETFL, O_ASYNC | O_NONBLOCK) == 0, "F_SETFL O_ASYNC");
    SETUP_CHECK(pipe(at) == 0, "pipe");
    own(at[0], F_OWNER_TID, (pid_t)syscall(SYS_gettid));
    SETUP_CHECK(fcntl(at[0], F_SETSIG, SIGRTMIN + 3) == 0, "F_SETSIG");
    SETUP_CHECK(fcntl(at[0], F_SETFL, O_ASYNC) == 0, "F_SETFL O_ASYNC");
}

static void check_owner(int fd, int type, pid_t pid, int sig, const char *what)
{
    struct f_owner_ex o = {0};
    CHECK(fcntl(fd, F_GETOWN_EX, &o) == 0 && o.type == type && o.pid == pid,
          "%s: owner type %d pid %d, want %d %d", what, o.type, o.pid, type, (int)pid);
    CHECK(fcntl(fd, F_GETSIG) == sig, "%s: F_GETSIG %d, want %d", what, fcntl(fd, F_GETSIG),
          sig);
    CHECK(fcntl(fd, F_GETFL) & O_ASYNC, "%s: lost O_ASYNC", what);
}

/* write to wfd: sig must arrive (blocked: taken with sigtimedwait) naming rfd */
static void check_delivery(int wfd, int rfd, int sig, const char *what)
{
    siginfo_t si;
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, sig);
    struct timespec zero = {0, 0}, wait = {5, 0};
    while (sigtimedwait(&m, &si, &zero) == sig) /* nothing left from before */
        ;
    CHECK(write(wfd, "x", 1) == 1, "%s: write", what);
    int got = sigtimedwait(&m, &si, &wait);
    CHECK(got == sig, "%s: signal %d not delivered (got %d errno %d)", what, sig, got, errno);
    if (got == sig && sig != SIGIO)
        CHECK(si.si_fd == rfd && si.si_code == POLL_IN, "%s: si_fd %d si_code %d, want %d %d",
              what, si.si_fd, si.si_code, rfd, POLL_IN);
    char c;
    CHECK(read(rfd, &c, 1) == 1, "%s: read", what);
}

static void verify_async(void)
{
    check_owner(ap[0], F_OWNER_PID, getpid(), SIGRTMIN + 1, "pipe");
    check_owner(as[0], F_OWNER_PGRP, getpgrp(), 0, "socket");
    check_owner(at[0], F_OWNER_TID, (pid_t)syscall(SYS_gettid), SIGRTMIN + 3, "tid pipe");
    check_delivery(ap[1], ap[0], SIGRTMIN + 1, "pipe");
    check_delivery(as[1], as[0], SIGIO, "socket");
    check_delivery(at[1], at[0], SIGRTMIN + 3, "tid pipe");
}

/* ------------------------------------------------------------------ memfdexec */

#define ALL_SEALS (F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE)
static int mx, mx_path, my;
static void *mx_map, *my_map;
static size_t mx_len, my_len;
static uint64_t true_hash;

static int load(const char *name, int seal, size_t *len)
{
    char *data;
    ssize_t n = read_file("/bin/true", &data);
    SETUP_CHECK(n > 0, "read /bin/true");
    int fd = (int)syscall(SYS_memfd_create, name, MFD_ALLOW_SEALING | MFD_CLOEXEC);
    SETUP_CHECK(fd >= 0, "memfd_create");
    SETUP_CHECK(write(fd, data, (size_t)n) == n, "write memfd");
    true_hash = hash_mem(data, (size_t)n, 1);
    free(data);
    if (seal)
        SETUP_CHECK(fcntl(fd, F_ADD_SEALS, ALL_SEALS) == 0, "F_ADD_SEALS");
    *len = (size_t)n;
    return fd;
}

/* fork + execveat(fd, "", AT_EMPTY_PATH): the exit status, or 100 + errno */
static int run_fd(int fd)
{
    pid_t c = fork();
    if (c == 0) {
        char *argv[] = {"true", NULL}, *envp[] = {NULL};
        syscall(SYS_execveat, fd, "", argv, envp, AT_EMPTY_PATH);
        _exit(100 + errno);
    }
    int st = -1;
    if (c < 0 || waitpid(c, &st, 0) != c)
        return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 200 + WTERMSIG(st);
}

static void setup_memfdexec(void)
{
    mx = load("ckpt-true", 1, &mx_len);
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", mx);
    mx_path = open(path, O_PATH | O_CLOEXEC);
    SETUP_CHECK(mx_path >= 0, "open O_PATH");
    mx_map = mmap(NULL, mx_len, PROT_READ, MAP_SHARED, mx, 0);
    SETUP_CHECK(mx_map != MAP_FAILED, "mmap sealed");
    my = load("ckpt-true-open", 0, &my_len);
    my_map = mmap(NULL, my_len, PROT_READ | PROT_WRITE, MAP_SHARED, my, 0);
    SETUP_CHECK(my_map != MAP_FAILED, "mmap writable");
    int r;
    errno = 0;
    SETUP_CHECK((r = run_fd(mx)) == 0, "execveat sealed memfd");
    SETUP_CHECK((r = run_fd(mx_path)) == 0, "execveat O_PATH fd");
    SETUP_CHECK((r = run_fd(my)) == 0, "execveat unsealed memfd");
}

static void verify_memfdexec(void)
{
    int seals = fcntl(mx, F_GET_SEALS);
    CHECK(seals == ALL_SEALS, "seals %#x, want %#x", seals, ALL_SEALS);
    CHECK(fcntl(my, F_GET_SEALS) == 0, "the unsealed memfd has seals %#x", fcntl(my, F_GET_SEALS));
    CHECK(write(mx, "x", 1) < 0 && errno == EPERM, "a write to the sealed memfd was not refused");
    CHECK(hash_mem(mx_map, mx_len, 1) == true_hash, "sealed memfd mapping differs");
    CHECK(hash_mem(my_map, my_len, 1) == true_hash, "unsealed memfd mapping differs");
    struct stat st;
    CHECK(fstat(mx, &st) == 0 && (size_t)st.st_size == mx_len, "sealed memfd size changed");
    int r;
    CHECK((r = run_fd(mx)) == 0, "execveat of the sealed memfd: status %d (100+errno)", r);
    CHECK((r = run_fd(mx_path)) == 0, "execveat of its O_PATH fd: status %d (100+errno)", r);
    CHECK((r = run_fd(my)) == 0, "execveat of the unsealed memfd: status %d (100+errno)", r);
}

/* ------------------------------------------------------------------ sharedfiles */

static int ctl[2], back[2];
static pid_t child;

/* the child: wait for an fd number on ctl, read "hello" from that fd (it exists only in
   the shared table), open /dev/null and send its number back; exit 0 if all went well */
static int sharer(void *arg)
{
    (void)arg;
    int fd = -1, ok = 1;
    char buf[8] = {0};
    if (read(ctl[0], &fd, sizeof(fd)) != sizeof(fd))
        _exit(3);
    if (read(fd, buf, 5) != 5 || memcmp(buf, "hello", 5) != 0)
        ok = 0;
    int mine = open("/dev/null", O_RDONLY);
    if (write(back[1], &mine, sizeof(mine)) != sizeof(mine))
        _exit(4);
    _exit(ok ? 0 : 5);
}

static pid_t clone_sharer(int flags)
{
    size_t len = 256 * 1024;
    char *stack = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    SETUP_CHECK(stack != MAP_FAILED, "mmap stack");
    pid_t c = clone(sharer, stack + len, flags, NULL);
    SETUP_CHECK(c > 0, "clone(CLONE_FILES)");
    return c;
}

static void setup_sharedfiles(void)
{
    SETUP_CHECK(pipe(ctl) == 0 && pipe(back) == 0, "pipe");
    child = clone_sharer(CLONE_FILES | SIGCHLD);
}

static void verify_sharedfiles(void)
{
    int p[2];
    CHECK(pipe(p) == 0 && write(p[1], "hello", 5) == 5, "pipe");
    CHECK(write(ctl[1], &p[0], sizeof(p[0])) == sizeof(p[0]), "write ctl");
    int theirs = -1;
    CHECK(read(back[0], &theirs, sizeof(theirs)) == sizeof(theirs), "read back");
    struct stat st;
    CHECK(theirs >= 0 && fstat(theirs, &st) == 0 && S_ISCHR(st.st_mode) &&
              st.st_rdev == makedev(1, 3),
          "fd %d the child opened is not /dev/null here: the table is not shared", theirs);
    int status = -1;
    CHECK(waitpid(child, &status, 0) == child, "waitpid %d: errno %d", (int)child, errno);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0,
          "the child (pid %d) failed: status %#x (5: could not read the parent's new fd)",
          (int)child, status);
}

/* sharedsibling: a child forks a grandchild with CLONE_PARENT|CLONE_FILES (its parent is
   the root, its table the child's) */
static pid_t grandchild;

static void setup_sharedsibling(void)
{
    int report[2];
    SETUP_CHECK(pipe(report) == 0, "pipe");
    child = fork();
    SETUP_CHECK(child >= 0, "fork");
    if (child == 0) {
        SETUP_CHECK(pipe(ctl) == 0 && pipe(back) == 0, "pipe"); /* the sharer waits on ctl */
        pid_t g = clone_sharer(CLONE_PARENT | CLONE_FILES | SIGCHLD);
        SETUP_CHECK(write(report[1], &g, sizeof(g)) == sizeof(g), "write");
        for (;;)
            pause();
    }
    SETUP_CHECK(read(report[0], &grandchild, sizeof(grandchild)) == sizeof(grandchild), "read");
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    if (!strcmp(mode, "async"))
        setup_async();
    else if (!strcmp(mode, "memfdexec"))
        setup_memfdexec();
    else if (!strcmp(mode, "sharedfiles"))
        setup_sharedfiles();
    else if (!strcmp(mode, "sharedsibling"))
        setup_sharedsibling();
    else
        SETUP_CHECK(0, "usage: fdstate async|memfdexec|sharedfiles|sharedsibling");
    say("READY pid=%d mode=%s child=%d grandchild=%d", (int)getpid(), mode, (int)child,
        (int)grandchild);
    while (!got_usr2)
        sigsuspend(&old);
    if (!strcmp(mode, "async"))
        verify_async();
    else if (!strcmp(mode, "memfdexec"))
        verify_memfdexec();
    else if (!strcmp(mode, "sharedfiles"))
        verify_sharedfiles();
    else {
        kill(child, SIGKILL);
        kill(grandchild, SIGKILL);
    }
    finish("");
}
