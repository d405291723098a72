/* reopen: pipes opened again through /proc/PID/fd, FIFOs between processes and deleted
 * FIFOs — several open file descriptions of one pipe, each with its own flags.
 *
 * usage: reopen pipes | fifos   (run in a scratch directory; the child runs in ./kids)
 * READY pid= child=   then waits in sigsuspend() until SIGUSR2, then checks and prints
 * VERIFY OK pid=  (exit 0)  or  VERIFY FAIL pid= reason=  (exit 1)
 *
 * pipes: pipe P holding 1000 bytes, plus a second reader (O_NONBLOCK), a second writer
 *   and an O_RDWR description, all opened through /proc/self/fd; pipe Q whose two
 *   ends were closed after an O_RDWR description was opened (it holds "xyz"); pipe R
 *   whose read end was closed (it holds "keep": readable by opening it again); a child
 *   holding P's inherited ends and one description of its own, and pipe S whose read
 *   end only the child holds, twice (the second opened through /proc).
 * fifos: FIFO f1 (a path) open O_RDWR here and O_RDONLY|O_NONBLOCK and O_WRONLY in the
 *   child, holding "fifo-data"; FIFO f2 open O_RDWR and O_RDONLY|O_NONBLOCK here, then
 *   its path deleted, holding "gone-fifo".
 * Checked: every fd's F_GETFL and FD_CLOEXEC; descriptions of one pipe are one pipe
 * (bytes written through one are read through another) yet their own descriptions
 * (O_NONBLOCK on one only); the buffered bytes; a deleted FIFO's path stays gone; the
 * child checks its own (its exit status).
 */
#include "wl.h"

#include <sys/ioctl.h>
#include <sys/wait.h>

static volatile sig_atomic_t got_usr2, child_go;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}
static void on_usr1(int sig)
{
    (void)sig;
    child_go = 1;
}

#define MAXF 16
#define MODE (O_ACCMODE | O_NONBLOCK)
static int fds[MAXF], fl[MAXF], fdfl[MAXF], nf;
static pid_t child;

static int track(int fd)
{
    SETUP_CHECK(fd >= 0, "open");
    fds[nf++] = fd;
    return fd;
}

static int reopen(int fd, int flags)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    return open(path, flags);
}

static int nread(int fd)
{
    int n = -1;
    return ioctl(fd, FIONREAD, &n) == 0 ? n : -1;
}

static int read_is(int fd, const char *want, size_t len)
{
    char buf[2048];
    ssize_t n = read(fd, buf, len);
    return n == (ssize_t)len && memcmp(buf, want, len) == 0;
}

static void snapshot(void)
{
    for (int i = 0; i < nf; i++) {
        fl[i] = fcntl(fds[i], F_GETFL);
        fdfl[i] = fcntl(fds[i], F_GETFD);
    }
}

static void check_table(void)
{
    for (int i = 0; i < nf; i++) {
        int f = fcntl(fds[i], F_GETFL), d = fcntl(fds[i], F_GETFD);
        CHECK(f == fl[i], "fd %d: F_GETFL %o, want %o", fds[i], f, fl[i]);
        CHECK(d == fdfl[i], "fd %d: F_GETFD %d, want %d", fds[i], d, fdfl[i]);
    }
}

static ino_t ino(int fd)
{
    struct stat st;
    return fstat(fd, &st) == 0 ? st.st_ino : 0;
}

static void child_wait(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    while (!child_go)
        pause();
}

static int child_done(void)
{
    int status = 0;
    return kill(child, SIGUSR1) == 0 && waitpid(child, &status, 0) == child &&
           WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

/* ------------------------------------------------------------------ pipes */

static int p[2], p_rd2, p_wr2, p_rw, q_rw, r_wr, s_wr;
static char data[1000];

static void setup_pipes(void)
{
    for (size_t i = 0; i < sizeof(data); i++)
        data[i] = (char)('a' + i % 26);
    SETUP_CHECK(pipe(p) == 0 && write(p[1], data, sizeof(data)) == (ssize_t)sizeof(data),
                "pipe P");
    track(p[0]);
    track(p[1]);
    p_rd2 = track(reopen(p[0], O_RDONLY | O_NONBLOCK));
    p_wr2 = track(reopen(p[1], O_WRONLY | O_CLOEXEC));
    p_rw = track(reopen(p[0], O_RDWR));
    int q[2];
    SETUP_CHECK(pipe(q) == 0 && write(q[1], "xyz", 3) == 3, "pipe Q");
    q_rw = track(reopen(q[0], O_RDWR));
    close(q[0]);
    close(q[1]);
    int r[2];
    SETUP_CHECK(pipe(r) == 0 && write(r[1], "keep", 4) == 4, "pipe R");
    close(r[0]);
    r_wr = track(r[1]);
    int s[2];
    SETUP_CHECK(pipe(s) == 0, "pipe S");
    SETUP_CHECK(mkdir("kids", 0755) == 0, "mkdir kids");
    child = fork();
    SETUP_CHECK(child >= 0, "fork");
    if (child == 0) {
        SETUP_CHECK(chdir("kids") == 0, "chdir");
        close(s[1]);
        int own = reopen(p[0], O_RDONLY);  /* its own description of P */
        int s2 = reopen(s[0], O_RDONLY | O_NONBLOCK);
        SETUP_CHECK(own >= 0 && s2 >= 0, "child reopen");
        child_wait();
        CHECK(ino(own) == ino(p[0]) && ino(s2) == ino(s[0]), "child: not the same pipes");
        CHECK((fcntl(own, F_GETFL) & MODE) == O_RDONLY && (fcntl(s2, F_GETFL) & O_NONBLOCK) &&
                  !(fcntl(s[0], F_GETFL) & O_NONBLOCK),
              "child: flags %o %o %o", fcntl(own, F_GETFL), fcntl(s2, F_GETFL),
              fcntl(s[0], F_GETFL));
        /* the parent wrote "to-child" into S and "P!" into P before signalling */
        CHECK(read_is(s2, "to-child", 8), "child: S's bytes");
        CHECK(read_is(own, "P!", 2), "child: P's bytes");
        if (wl_fails)
            say("CHILD FAIL %s", wl_fail_buf);
        _exit(wl_fails ? 1 : 0);
    }
    close(s[0]);
    s_wr = track(s[1]);
}

static void verify_pipes(void)
{
    check_table();
    ino_t pi = ino(p[0]);
    CHECK(ino(p[1]) == pi && ino(p_rd2) == pi && ino(p_wr2) == pi && ino(p_rw) == pi,
          "P's descriptions are not one pipe");
    CHECK(nread(p[0]) == (int)sizeof(data), "P holds %d bytes, want %zu", nread(p[0]),
          sizeof(data));
    CHECK(read_is(p_rd2, data, sizeof(data)), "P's bytes, read through the second reader");
    char c;
    CHECK(read(p_rd2, &c, 1) == -1 && errno == EAGAIN, "the second reader is not O_NONBLOCK");
    CHECK(write(p_wr2, "W2", 2) == 2 && read_is(p_rw, "W2", 2), "second writer → O_RDWR");
    CHECK(write(p_rw, "RW", 2) == 2 && read_is(p[0], "RW", 2), "O_RDWR → first reader");
    CHECK(nread(q_rw) == 3 && read_is(q_rw, "xyz", 3), "Q (only an O_RDWR description left)");
    CHECK(write(q_rw, "again", 5) == 5 && read_is(q_rw, "again", 5), "Q reads what it writes");
    int r_rd = reopen(r_wr, O_RDONLY | O_NONBLOCK);
    CHECK(r_rd >= 0 && read_is(r_rd, "keep", 4), "R's bytes (its read end was closed)");
    CHECK(write(s_wr, "to-child", 8) == 8 && write(p[1], "P!", 2) == 2, "write for the child");
    CHECK(child_done(), "the child's checks failed");
}

/* ------------------------------------------------------------------ fifos */

static int f1_rw, f2_rw, f2_rd;

static void setup_fifos(void)
{
    SETUP_CHECK(mkfifo("f1", 0640) == 0 && mkfifo("f2", 0600) == 0, "mkfifo");
    f1_rw = track(open("f1", O_RDWR));
    SETUP_CHECK(write(f1_rw, "fifo-data", 9) == 9, "write f1");
    f2_rw = track(open("f2", O_RDWR | O_CLOEXEC));
    f2_rd = track(open("f2", O_RDONLY | O_NONBLOCK));
    SETUP_CHECK(write(f2_rw, "gone-fifo", 9) == 9 && unlink("f2") == 0, "f2");
    SETUP_CHECK(mkdir("kids", 0755) == 0, "mkdir kids");
    child = fork();
    SETUP_CHECK(child >= 0, "fork");
    if (child == 0) {
        SETUP_CHECK(chdir("kids") == 0, "chdir");
        int rd = open("../f1", O_RDONLY | O_NONBLOCK), wr = open("../f1", O_WRONLY);
        SETUP_CHECK(rd >= 0 && wr >= 0, "child opens f1");
        child_wait();
        CHECK(ino(rd) == ino(f1_rw) && ino(wr) == ino(f1_rw), "child: not the same FIFO");
        CHECK((fcntl(rd, F_GETFL) & MODE) == (O_RDONLY | O_NONBLOCK) &&
                  (fcntl(wr, F_GETFL) & MODE) == O_WRONLY,
              "child: flags %o %o", fcntl(rd, F_GETFL), fcntl(wr, F_GETFL));
        CHECK(read_is(rd, "fifo-data", 9), "child: f1's bytes");
        CHECK(write(wr, "from-child", 10) == 10, "child: write f1");
        if (wl_fails)
            say("CHILD FAIL %s", wl_fail_buf);
        _exit(wl_fails ? 1 : 0);
    }
}

static void verify_fifos(void)
{
    check_table();
    struct stat st;
    CHECK(stat("f1", &st) == 0 && S_ISFIFO(st.st_mode) && st.st_ino == ino(f1_rw),
          "f1 is not the FIFO fd %d has open", f1_rw);
    CHECK(access("f2", F_OK) != 0 && errno == ENOENT, "the deleted FIFO f2 has a name again");
    CHECK(fstat(f2_rd, &st) == 0 && S_ISFIFO(st.st_mode) && ino(f2_rw) == st.st_ino,
          "f2's descriptions are not one FIFO");
    CHECK(nread(f2_rd) == 9 && read_is(f2_rd, "gone-fifo", 9), "f2's bytes");
    CHECK(write(f2_rw, "more", 4) == 4 && read_is(f2_rd, "more", 4), "f2: write → read");
    CHECK(child_done(), "the child's checks failed");
    CHECK(read_is(f1_rw, "from-child", 10), "f1: the child's bytes");
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "pipes";
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    int pipes = !strcmp(mode, "pipes");
    if (pipes)
        setup_pipes();
    else
        setup_fifos();
    snapshot();
    say("READY pid=%d child=%d", (int)getpid(), (int)child);
    while (!got_usr2)
        sigsuspend(&old);
    if (pipes)
        verify_pipes();
    else
        verify_fifos();
    finish("");
}
