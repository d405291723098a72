/* A tmux-like pty pair inside one process tree (tests/test_pty.py).
 *
 *   pty mux [packet]
 *
 * The parent P (the "multiplexer") opens /dev/ptmx, sets the slave's modes through
 * the master (ECHO off, VINTR ^G) and the window size (33x101), packet mode when
 * asked, then forks C, which calls setsid(), opens the slave by name as its
 * controlling terminal (TIOCSCTTY) on fds 0-2, and forks G in a process group of its
 * own that C makes the terminal's foreground group. G reads lines from the terminal
 * and answers on it; C waits (a shell's shape). P copies every line the master reads
 * to its stdout (the log), and takes commands from the file "cmd" on SIGUSR2:
 *
 *   ping T     -> writes "ping T" to the master; G answers `PONG pid=G got=T`
 *   verify T   -> P checks its master (`MVERIFY OK|FAIL pid=P tty=/dev/pts/N ...`), then
 *                 writes "verify T": G checks its terminal, session, group, foreground,
 *                 modes and window size (`VERIFY OK|FAIL pid=G ...`) and makes C check
 *                 its own (`LVERIFY OK|FAIL pid=C ...`)
 *   hold T     -> P stops reading the master and makes G write `SAID got=T`, which
 *                 stays queued for the master (`HOLDING pid=P n=BYTES`)
 *   resume     -> P reads the master again
 *   nap T      -> G stops reading for good and "pending T" stays queued for the slave
 *   ldisc      -> P sets the master's line discipline to N_NULL
 *
 * Every check is made by the process itself, from inside, after the restore.
 */
#include "wl.h"

#include <poll.h>
#include <sys/ioctl.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <termios.h>

#define ROWS 33
#define COLS 101
#define VINTR_CHAR 7

static volatile sig_atomic_t got_usr2, got_usr1, got_chld;
static void on_usr2(int s) { (void)s; got_usr2 = 1; }
static void on_usr1(int s) { (void)s; got_usr1 = 1; }
static void on_chld(int s) { (void)s; got_chld = 1; }

static void check_modes(int fd, const char *who)
{
    struct termios t;
    CHECK(tcgetattr(fd, &t) == 0, "%s: tcgetattr errno %d", who, errno);
    CHECK(!(t.c_lflag & ECHO), "%s: ECHO is on", who);
    CHECK(t.c_lflag & ICANON, "%s: ICANON is off", who);
    CHECK(t.c_cc[VINTR] == VINTR_CHAR, "%s: VINTR is %d, not %d", who, t.c_cc[VINTR], VINTR_CHAR);
    CHECK(t.c_oflag & OPOST, "%s: OPOST is off", who);
    struct winsize ws;
    CHECK(ioctl(fd, TIOCGWINSZ, &ws) == 0, "%s: TIOCGWINSZ errno %d", who, errno);
    CHECK(ws.ws_row == ROWS && ws.ws_col == COLS, "%s: window %dx%d, not %dx%d", who, ws.ws_row,
          ws.ws_col, ROWS, COLS);
}

/* The terminal on fd 0 is our controlling terminal: /dev/tty opens it, TIOCGSID is our
   session, /proc/self/stat names it. */
static void check_ctty(const char *who)
{
    struct stat s0, st;
    CHECK(fstat(0, &s0) == 0, "%s: fstat 0", who);
    int t = open("/dev/tty", O_RDWR | O_NOCTTY);
    CHECK(t >= 0, "%s: open /dev/tty errno %d", who, errno);
    if (t >= 0) {
        CHECK(fstat(t, &st) == 0 && st.st_rdev == makedev(5, 0), "%s: /dev/tty fstat", who);
        pid_t fg = tcgetpgrp(t);
        CHECK(fg == tcgetpgrp(0), "%s: /dev/tty and fd 0 disagree on the foreground", who);
        close(t);
    }
    pid_t sid = -1;
    CHECK(ioctl(0, TIOCGSID, &sid) == 0 && sid == getsid(0),
          "%s: the terminal's session is %d, ours %d (errno %d)", who, (int)sid, (int)getsid(0),
          errno);
    char *stat = NULL;
    if (read_file("/proc/self/stat", &stat) > 0) {
        char *p = strrchr(stat, ')');
        int tty_nr = 0;
        if (p && sscanf(p + 2, "%*c %*d %*d %*d %d", &tty_nr) == 1)
            CHECK((dev_t)(unsigned)tty_nr == s0.st_rdev, "%s: /proc tty_nr %#x, fd 0 is %#lx",
                  who, tty_nr, (unsigned long)s0.st_rdev);
        else
            fail("%s: cannot parse /proc/self/stat", who);
        free(stat);
    }
}

/* ---- C: the session leader (a shell) ---------------------------------------- */

static void leader_verify(pid_t g)
{
    wl_fails = 0;
    wl_fail_buf[0] = 0;
    CHECK(getsid(0) == getpid(), "C: session %d is not ours", (int)getsid(0));
    CHECK(getpgrp() == getpid(), "C: group %d is not ours", (int)getpgrp());
    check_ctty("C");
    CHECK(tcgetpgrp(0) == g, "C: foreground group %d, not G's %d", (int)tcgetpgrp(0), (int)g);
    check_modes(0, "C");
    const char *name = ttyname(0);
    char line[6400];
    if (wl_fails)
        snprintf(line, sizeof(line), "LVERIFY FAIL pid=%d tty=%s reason=%s", (int)getpid(),
                 name ? name : "?", wl_fail_buf);
    else
        snprintf(line, sizeof(line), "LVERIFY OK pid=%d tty=%s fg=%d sid=%d", (int)getpid(),
                 name ? name : "?", (int)tcgetpgrp(0), (int)getsid(0));
    say("%s", line);
}

/* ---- G: the foreground job, reading the terminal -------------------------- */

static void job_verify(const char *token)
{
    wl_fails = 0;
    wl_fail_buf[0] = 0;
    pid_t c = getppid();
    CHECK(getsid(0) == c, "G: session %d, not C's %d", (int)getsid(0), (int)c);
    CHECK(getpgrp() == getpid(), "G: group %d is not ours", (int)getpgrp());
    CHECK(tcgetpgrp(0) == getpgrp(), "G: foreground group %d, not ours", (int)tcgetpgrp(0));
    check_ctty("G");
    check_modes(0, "G");
    /* fds 0-2: one open file description, read-write */
    int fl = fcntl(0, F_GETFL);
    CHECK((fl & O_ACCMODE) == O_RDWR, "G: fd 0 is not O_RDWR");
    fcntl(0, F_SETFL, fl | O_APPEND);
    CHECK(fcntl(2, F_GETFL) & O_APPEND, "G: fds 0 and 2 no longer share a description");
    fcntl(0, F_SETFL, fl);
    const char *name = ttyname(0);
    char extra[512];
    snprintf(extra, sizeof(extra), "got=%s tty=%s sid=%d pgid=%d", token, name ? name : "?",
             (int)getsid(0), (int)getpgrp());
    kill(c, SIGUSR1); /* C checks itself too */
    if (wl_fails)
        say("VERIFY FAIL pid=%d %s reason=%s", (int)getpid(), extra, wl_fail_buf);
    else
        say("VERIFY OK pid=%d %s", (int)getpid(), extra);
}

static void job(void)
{
    setpgid(0, 0);
    for (int i = 0; i < 3000 && tcgetpgrp(0) != getpgrp(); i++)
        usleep(10000);
    SETUP_CHECK(tcgetpgrp(0) == getpgrp(), "G: not in the foreground");
    say("GREADY pid=%d", (int)getpid());
    char line[512];
    size_t have = 0;
    for (;;) {
        ssize_t n = read(0, line + have, sizeof(line) - 1 - have);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            _exit(3);
        have += (size_t)n;
        line[have] = 0;
        char *nl;
        while ((nl = strchr(line, '\n')) != NULL) {
            *nl = 0;
            if (strncmp(line, "ping ", 5) == 0)
                say("PONG pid=%d got=%s", (int)getpid(), line + 5);
            else if (strncmp(line, "say ", 4) == 0)
                say("SAID got=%s", line + 4);
            else if (strncmp(line, "verify ", 7) == 0)
                job_verify(line + 7);
            else if (strcmp(line, "nap") == 0)
                for (;;)
                    sleep(1000);
            size_t used = (size_t)(nl + 1 - line);
            memmove(line, nl + 1, have - used + 1);
            have -= used;
        }
        if (have == sizeof(line) - 1)
            have = 0;
    }
}

static void leader(const char *name, int master)
{
    close(master);
    SETUP_CHECK(setsid() == getpid(), "setsid");
    int s = open(name, O_RDWR | O_NOCTTY);
    SETUP_CHECK(s >= 0, "open the slave");
    SETUP_CHECK(ioctl(s, TIOCSCTTY, 0) == 0, "TIOCSCTTY");
    for (int fd = 0; fd < 3; fd++)
        SETUP_CHECK(dup2(s, fd) == fd, "dup2");
    if (s > 2)
        close(s);
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    sigaddset(&block, SIGCHLD);
    sigprocmask(SIG_BLOCK, &block, &old);
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_handler = on_chld;
    sigaction(SIGCHLD, &sa, NULL);
    pid_t g = fork();
    SETUP_CHECK(g >= 0, "fork G");
    if (g == 0) {
        sigprocmask(SIG_SETMASK, &old, NULL);
        signal(SIGUSR1, SIG_DFL);
        signal(SIGCHLD, SIG_DFL);
        job();
    }
    setpgid(g, g);
    signal(SIGTTOU, SIG_IGN); /* tcsetpgrp from the background, as shells do */
    SETUP_CHECK(tcsetpgrp(0, g) == 0, "tcsetpgrp");
    signal(SIGTTOU, SIG_DFL);
    for (;;) {
        sigsuspend(&old);
        if (got_usr1) {
            got_usr1 = 0;
            leader_verify(g);
        }
        if (got_chld) {
            int st;
            if (waitpid(g, &st, WNOHANG) == g)
                _exit(0);
            got_chld = 0;
        }
    }
}

/* ---- P: the multiplexer, holding the master ------------------------------- */

static int master = -1, packet, holding;
static char tty_name[64];

static void put(const char *s)
{
    size_t n = strlen(s);
    SETUP_CHECK(write(master, s, n) == (ssize_t)n, "write to the master");
}

static void master_verify(const char *token)
{
    wl_fails = 0;
    wl_fail_buf[0] = 0;
    int n = -1, pkt = -1, lck = -1;
    CHECK(ioctl(master, TIOCGPTN, &n) == 0, "P: TIOCGPTN errno %d", errno);
    char want[64];
    snprintf(want, sizeof(want), "/dev/pts/%d", n);
    const char *name = ptsname(master);
    CHECK(name && strcmp(name, want) == 0, "P: ptsname %s, TIOCGPTN %d", name ? name : "?", n);
    CHECK(ioctl(master, TIOCGPKT, &pkt) == 0 && pkt == packet, "P: packet mode %d, not %d", pkt,
          packet);
    CHECK(ioctl(master, TIOCGPTLCK, &lck) == 0 && lck == 0, "P: locked %d", lck);
    check_modes(master, "P");
    if (wl_fails)
        say("MVERIFY FAIL pid=%d tty=%s reason=%s", (int)getpid(), want, wl_fail_buf);
    else
        say("MVERIFY OK pid=%d tty=%s packet=%d", (int)getpid(), want, pkt);
    char line[128];
    snprintf(line, sizeof(line), "verify %s\n", token);
    put(line);
}

static void command(void)
{
    char *cmd = NULL;
    if (read_file("cmd", &cmd) < 0)
        return;
    char *nl = strchr(cmd, '\n');
    if (nl)
        *nl = 0;
    char line[256];
    if (strncmp(cmd, "ping ", 5) == 0) {
        snprintf(line, sizeof(line), "%s\n", cmd);
        put(line);
    } else if (strncmp(cmd, "verify ", 7) == 0) {
        master_verify(cmd + 7);
    } else if (strncmp(cmd, "hold ", 5) == 0) {
        holding = 1;
        snprintf(line, sizeof(line), "say %s\n", cmd + 5);
        put(line);
        int want = (int)strlen("SAID got=\r\n") + (int)strlen(cmd + 5), have = 0;
        for (int i = 0; i < 1000 && have < want; i++) {
            usleep(10000);
            ioctl(master, FIONREAD, &have);
        }
        say("HOLDING pid=%d n=%d", (int)getpid(), have);
    } else if (strcmp(cmd, "resume") == 0) {
        holding = 0;
        say("RESUMED pid=%d", (int)getpid());
    } else if (strncmp(cmd, "nap ", 4) == 0) {
        snprintf(line, sizeof(line), "nap\npending %s\n", cmd + 4);
        put(line);
        say("NAPPING pid=%d", (int)getpid());
    } else if (strcmp(cmd, "ldisc") == 0) {
        int disc = 27; /* N_NULL */
        int r = ioctl(master, TIOCSETD, &disc);
        say("LDISC pid=%d ok=%d errno=%d", (int)getpid(), r == 0, r ? errno : 0);
    }
    free(cmd);
}

/* Copy complete lines read from the master to stdout (\r of ONLCR dropped). */
static char inbuf[65536];
static size_t inlen;

static int relay(int announce_ready, pid_t c)
{
    char buf[4096];
    ssize_t n = read(master, buf, sizeof(buf));
    if (n < 0)
        return errno == EINTR || errno == EAGAIN ? 0 : -1;
    size_t off = 0;
    if (packet && n > 0) {
        if (buf[0] != TIOCPKT_DATA) {
            say("PKTSTATUS pid=%d byte=%d", (int)getpid(), buf[0]);
            return 0;
        }
        off = 1;
    }
    for (ssize_t i = (ssize_t)off; i < n && inlen < sizeof(inbuf) - 1; i++)
        if (buf[i] != '\r')
            inbuf[inlen++] = buf[i];
    inbuf[inlen] = 0;
    int ready = 0;
    char *nl;
    while ((nl = strchr(inbuf, '\n')) != NULL) {
        *nl = 0;
        say("%s", inbuf);
        if (announce_ready && strncmp(inbuf, "GREADY ", 7) == 0) {
            say("READY pid=%d child=%d gchild=%s tty=%s packet=%d", (int)getpid(), (int)c,
                inbuf + 11, tty_name, packet);
            ready = 1;
        }
        size_t used = (size_t)(nl + 1 - inbuf);
        memmove(inbuf, nl + 1, inlen - used + 1);
        inlen -= used;
    }
    return ready;
}

int main(int argc, char **argv)
{
    SETUP_CHECK(argc >= 2 && strcmp(argv[1], "mux") == 0, "usage: pty mux [packet]");
    packet = argc > 2 && strcmp(argv[2], "packet") == 0;
    master = posix_openpt(O_RDWR | O_NOCTTY);
    SETUP_CHECK(master >= 0, "posix_openpt");
    SETUP_CHECK(grantpt(master) == 0 && unlockpt(master) == 0, "grantpt/unlockpt");
    snprintf(tty_name, sizeof(tty_name), "%s", ptsname(master));
    struct termios t;
    SETUP_CHECK(tcgetattr(master, &t) == 0, "tcgetattr master");
    t.c_lflag &= ~(tcflag_t)ECHO;
    t.c_cc[VINTR] = VINTR_CHAR;
    SETUP_CHECK(tcsetattr(master, TCSANOW, &t) == 0, "tcsetattr master");
    struct winsize ws = {.ws_row = ROWS, .ws_col = COLS};
    SETUP_CHECK(ioctl(master, TIOCSWINSZ, &ws) == 0, "TIOCSWINSZ");
    if (packet)
        SETUP_CHECK(ioctl(master, TIOCPKT, &packet) == 0, "TIOCPKT");

    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR2);
    sigprocmask(SIG_BLOCK, &block, &old);
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_usr2;
    sigaction(SIGUSR2, &sa, NULL);

    pid_t c = fork();
    SETUP_CHECK(c >= 0, "fork C");
    if (c == 0) {
        sigprocmask(SIG_SETMASK, &old, NULL);
        signal(SIGUSR2, SIG_DFL);
        leader(tty_name, master);
    }
    int ready = 0;
    for (;;) {
        struct pollfd p = {.fd = holding ? -1 : master, .events = POLLIN};
        int r = ppoll(&p, 1, NULL, &old);
        if (got_usr2) {
            got_usr2 = 0;
            command();
        }
        if (r > 0 && (p.revents & POLLIN)) {
            int got = relay(!ready, c);
            if (got < 0) {
                say("EXIT pid=%d errno=%d", (int)getpid(), errno);
                return 3;
            }
            ready |= got;
        } else if (r > 0 && (p.revents & (POLLHUP | POLLERR))) {
            say("HUP pid=%d", (int)getpid());
            return 4;
        }
    }
}
