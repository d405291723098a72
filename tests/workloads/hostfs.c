/* hostfs: a process whose files a restore re-creates or reopens on the host, in a
 * directory its own (unprivileged) user can change: the race tests swap these
 * names for symbolic links while ckpt restores it (tests/test_hostfs.py).
 *
 * usage: hostfs      (started as nobody in a directory nobody owns)
 *   sock        a unix stream listener bound to the relative name "sock", the file
 *               chmod'ed to 0640
 *   sub/dsock   a unix dgram socket bound to "sub/dsock", whose file was then
 *               unlinked (a "deleted" name)
 *   data        a regular file open O_RDWR at fd DATA_FD, holding "hostfs-data\n"
 *
 * READY pid= data_fd=
 * On SIGUSR2: checks its names (getsockname), that fd DATA_FD is its file (content,
 * owner), that "sock" is a socket file of mode 0640 owned by it and that
 * "sub/dsock" does not exist; VERIFY OK pid=  or  VERIFY FAIL pid= reason=
 */
#include "wl.h"

#include <sys/socket.h>
#include <sys/un.h>

#define DATA_FD 7
#define CONTENT "hostfs-data\n"

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static int bound(int type, const char *name)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, name, sizeof(a.sun_path) - 1);
    int s = socket(AF_UNIX, type, 0);
    SETUP_CHECK(s >= 0, "socket");
    SETUP_CHECK(bind(s, (struct sockaddr *)&a, sizeof(a)) == 0, name);
    return s;
}

static void check_name(int s, const char *want)
{
    struct sockaddr_un a;
    socklen_t len = sizeof(a);
    memset(&a, 0, sizeof(a));
    if (getsockname(s, (struct sockaddr *)&a, &len) != 0) {
        fail("getsockname %s errno=%d", want, errno);
        return;
    }
    CHECK(strcmp(a.sun_path, want) == 0, "socket name %s, want %s", a.sun_path, want);
}

int main(void)
{
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    SETUP_CHECK(mkdir("sub", 0755) == 0 || errno == EEXIST, "mkdir sub");
    unlink("sock");
    int l = bound(SOCK_STREAM, "sock");
    SETUP_CHECK(chmod("sock", 0640) == 0, "chmod sock");
    SETUP_CHECK(listen(l, 4) == 0, "listen");
    unlink("sub/dsock");
    int d = bound(SOCK_DGRAM, "sub/dsock");
    SETUP_CHECK(unlink("sub/dsock") == 0, "unlink sub/dsock");
    int f = open("data", O_RDWR | O_CREAT | O_TRUNC, 0600);
    SETUP_CHECK(f >= 0, "open data");
    SETUP_CHECK(write(f, CONTENT, strlen(CONTENT)) == (ssize_t)strlen(CONTENT), "write");
    SETUP_CHECK(dup2(f, DATA_FD) == DATA_FD, "dup2");
    close(f);
    say("READY pid=%d data_fd=%d", (int)getpid(), DATA_FD);
    while (!got_usr2)
        sigsuspend(&old);

    check_name(l, "sock");
    check_name(d, "sub/dsock");
    char buf[64] = {0};
    CHECK(pread(DATA_FD, buf, sizeof(buf) - 1, 0) == (ssize_t)strlen(CONTENT) &&
              strcmp(buf, CONTENT) == 0,
          "fd %d does not hold the file's content", DATA_FD);
    struct stat st;
    CHECK(fstat(DATA_FD, &st) == 0 && st.st_uid == getuid(), "fd %d: not my file", DATA_FD);
    if (lstat("sock", &st) != 0)
        fail("sock: lstat errno=%d", errno);
    else {
        CHECK(S_ISSOCK(st.st_mode), "sock is not a socket (mode %o)", st.st_mode);
        CHECK((st.st_mode & 07777) == 0640, "sock has mode %o, not 640", st.st_mode & 07777);
        CHECK(st.st_uid == getuid() && st.st_gid == getgid(), "sock is owned by %d:%d",
              (int)st.st_uid, (int)st.st_gid);
    }
    CHECK(lstat("sub/dsock", &st) != 0 && errno == ENOENT, "sub/dsock exists again");
    finish("");
}
