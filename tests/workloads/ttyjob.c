/* A shell job on a terminal (tests/test_tty.py): checkpointed with --shell-job,
 * restored with `ckpt restore --shell-job` on ANOTHER pseudo-terminal.
 *
 * Started by a small "shell" that is the session leader of a pty and runs it in
 * a process group of its own, in the foreground. stdin/stdout/stderr are that
 * terminal (one open file description). It adds:
 *   fd 3  /dev/tty, O_RDWR                           (its controlling terminal)
 *   fd 4  the terminal by name, O_WRONLY|O_NONBLOCK, close-on-exec
 * and turns ECHO off (its terminal mode, restored by ckpt), then prints
 * `READY pid=...` and reads lines from the terminal:
 *   "ping TOKEN"    -> `PONG pid=... got=TOKEN`          (still alive and reading)
 *   "verify TOKEN"  -> checks everything below, `VERIFY OK|FAIL pid=... got=TOKEN
 *                      tty=/dev/pts/N ...`, exits 0 / 1
 * Reading at all proves it is in the foreground group (else SIGTTIN stops it).
 */
#include "wl.h"

#include <sys/ioctl.h>
#include <sys/sysmacros.h>
#include <termios.h>

static int check_fd(int fd, int want_acc, int want_nonblock, int want_cloexec)
{
    int fl = fcntl(fd, F_GETFL);
    int fdfl = fcntl(fd, F_GETFD);
    if (fl < 0 || fdfl < 0) {
        fail("fd%d: fcntl errno %d", fd, errno);
        return 0;
    }
    CHECK((fl & O_ACCMODE) == want_acc, "fd%d: access mode %d, want %d", fd, fl & O_ACCMODE,
          want_acc);
    CHECK(!!(fl & O_NONBLOCK) == want_nonblock, "fd%d: O_NONBLOCK %d, want %d", fd,
          !!(fl & O_NONBLOCK), want_nonblock);
    CHECK(!!(fdfl & FD_CLOEXEC) == want_cloexec, "fd%d: cloexec %d, want %d", fd,
          !!(fdfl & FD_CLOEXEC), want_cloexec);
    CHECK(isatty(fd), "fd%d is not a terminal", fd);
    return 1;
}

static void verify(const char *token)
{
    struct stat s0, s1, s3, s4;
    CHECK(fstat(0, &s0) == 0 && fstat(1, &s1) == 0 && fstat(3, &s3) == 0 && fstat(4, &s4) == 0,
          "fstat errno %d", errno);
    check_fd(0, O_RDWR, 0, 0);
    check_fd(3, O_RDWR, 0, 0);
    check_fd(4, O_WRONLY, 1, 1);
    CHECK(s0.st_rdev == s1.st_rdev && s0.st_rdev == s4.st_rdev, "fds 0/1/4 on different ttys");
    CHECK(s3.st_rdev == makedev(5, 0), "fd3 is %u:%u, not /dev/tty", major(s3.st_rdev),
          minor(s3.st_rdev));
    /* one open file description for 0, 1, 2 (as the shell gave them) */
    int fl = fcntl(0, F_GETFL);
    fcntl(0, F_SETFL, fl | O_APPEND);
    CHECK(fcntl(2, F_GETFL) & O_APPEND, "fds 0 and 2 no longer share a file description");
    fcntl(0, F_SETFL, fl);
    /* job control: ckpt's session, a group of our own, in the foreground */
    pid_t pgrp = getpgrp();
    CHECK(pgrp == getpid(), "pgid %d is not our pid", (int)pgrp);
    CHECK(getsid(0) != getpid(), "we are a session leader");
    CHECK(tcgetpgrp(0) == pgrp, "foreground group is %d, not ours (%d)", (int)tcgetpgrp(0),
          (int)pgrp);
    /* /dev/tty is our controlling terminal and works */
    pid_t tsid = -1;
    CHECK(ioctl(3, TIOCGSID, &tsid) == 0 && tsid == getsid(0),
          "the terminal's session %d is not ours (%d)", (int)tsid, (int)getsid(0));
    CHECK(write(3, "", 0) == 0, "write to /dev/tty: errno %d", errno);
    /* the terminal mode the job set before the dump */
    struct termios t;
    CHECK(tcgetattr(0, &t) == 0, "tcgetattr errno %d", errno);
    CHECK(!(t.c_lflag & ECHO), "ECHO is on again");
    CHECK(t.c_lflag & ICANON, "ICANON is off");
    const char *name = ttyname(0);
    char extra[512];
    snprintf(extra, sizeof(extra), "got=%s tty=%s pgid=%d sid=%d", token, name ? name : "?",
             (int)pgrp, (int)getsid(0));
    finish(extra);
}

int main(void)
{
    /* wait until the shell made our group the foreground one (it does, before exec) */
    for (int i = 0; i < 3000 && tcgetpgrp(0) != getpgrp(); i++)
        usleep(10000);
    SETUP_CHECK(tcgetpgrp(0) == getpgrp(), "not in the foreground");
    int fd3 = open("/dev/tty", O_RDWR);
    SETUP_CHECK(fd3 == 3, "open /dev/tty as fd 3");
    const char *name = ttyname(0);
    SETUP_CHECK(name != NULL, "ttyname");
    int fd4 = open(name, O_WRONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    SETUP_CHECK(fd4 == 4, "open the terminal as fd 4");
    struct termios t;
    SETUP_CHECK(tcgetattr(0, &t) == 0, "tcgetattr");
    t.c_lflag &= ~(tcflag_t)ECHO;
    SETUP_CHECK(tcsetattr(0, TCSANOW, &t) == 0, "tcsetattr");
    say("READY pid=%d pgid=%d tty=%s", (int)getpid(), (int)getpgrp(), name);

    char line[256];
    size_t have = 0;
    for (;;) {
        ssize_t n = read(0, line + have, sizeof(line) - 1 - have);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            say("EXIT pid=%d read=%zd errno=%d", (int)getpid(), n, errno);
            return 3;
        }
        have += (size_t)n;
        line[have] = 0;
        char *nl;
        while ((nl = strchr(line, '\n')) != NULL) {
            *nl = 0;
            if (strncmp(line, "ping ", 5) == 0)
                say("PONG pid=%d got=%s", (int)getpid(), line + 5);
            else if (strncmp(line, "verify ", 7) == 0)
                verify(line + 7);
            size_t used = (size_t)(nl + 1 - line);
            memmove(line, nl + 1, have - used + 1);
            have -= used;
        }
        if (have == sizeof(line) - 1)
            have = 0;
    }
}
