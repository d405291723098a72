/* files: open files and per-process attributes.
 *
 * usage: files        (run in a scratch directory: it creates its files in the cwd)
 * READY pid= fds= umask= personality=
 *   then waits in sigsuspend() until SIGUSR2, then checks and prints
 * VERIFY OK pid=  (exit 0)  or  VERIFY FAIL pid= reason=  (exit 1)
 *
 * State set up: ro.dat read-only at offset 1000; append.log O_WRONLY|O_APPEND;
 * rw.dat O_RDWR at offset 5000 plus a dup() of it (the two share one offset);
 * cloexec.dat O_RDONLY|O_CLOEXEC at offset 10; /dev/null O_WRONLY|O_NONBLOCK;
 * /dev/zero; high.dat O_RDWR as fd 200 at offset 7;
 * cwd; umask 027; RLIMIT_NOFILE and RLIMIT_CORE soft limits changed; comm "ckfiles";
 * personality |= ADDR_NO_RANDOMIZE; session/process group (the test starts it with
 * setsid).
 * Checked after SIGUSR2: the fd table (same fds, same paths, same F_GETFL and
 * F_GETFD) and every offset; reads return the right bytes; writes land at the
 * restored offsets (O_APPEND ones at the end); the dup'd fd still shares the offset;
 * device numbers of /dev/null and /dev/zero; cwd,
 * umask, all 16 rlimits, comm, personality, sid/pgid.
 */
#include "wl.h"

#include <dirent.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/sysmacros.h>

#define MAXFD 256

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

struct fdrec {
    int used;
    char path[1024];
    int fl, fdfl;
};
static struct fdrec saved_fds[MAXFD];
static int nfds;
static int fd_ro, fd_app, fd_rw, fd_dup, fd_cx, fd_null, fd_zero;
static const int fd_high = 200;
static char saved_cwd[4096];
static struct rlimit saved_rl[RLIM_NLIMITS];
static int saved_pers;
static pid_t saved_pid, saved_sid, saved_pgid;
static unsigned char ro_content[8192], high_content[4096];

static void snapshot_fds(struct fdrec *out, int *count)
{
    memset(out, 0, sizeof(struct fdrec) * MAXFD);
    *count = 0;
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return;
    int self = dirfd(d);
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        int fd = atoi(e->d_name);
        if (fd == self || fd >= MAXFD)
            continue;
        char link[64];
        snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
        ssize_t n = readlink(link, out[fd].path, sizeof(out[fd].path) - 1);
        out[fd].path[n < 0 ? 0 : n] = 0;
        out[fd].fl = fcntl(fd, F_GETFL);
        out[fd].fdfl = fcntl(fd, F_GETFD);
        out[fd].used = 1;
        (*count)++;
    }
    closedir(d);
}

static void make_file(const char *path, unsigned char *content, size_t len, uint64_t seed)
{
    fill(content, len, seed);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    SETUP_CHECK(fd >= 0 && write(fd, content, len) == (ssize_t)len, "write file");
    close(fd);
}

static off_t pos(int fd)
{
    return lseek(fd, 0, SEEK_CUR);
}

static void check_file_equals(const char *path, const char *want)
{
    char *got;
    ssize_t n = read_file(path, &got);
    CHECK(n == (ssize_t)strlen(want) && memcmp(got, want, strlen(want)) == 0,
          "%s holds '%s', want '%s'", path, n >= 0 ? got : "(unreadable)", want);
    if (n >= 0)
        free(got);
}

static void verify(void)
{
    /* the fd table as a whole */
    static struct fdrec now[MAXFD];
    int count;
    snapshot_fds(now, &count);
    CHECK(count == nfds, "%d fds open, want %d", count, nfds);
    for (int fd = 0; fd < MAXFD; fd++) {
        struct fdrec *a = &saved_fds[fd], *b = &now[fd];
        if (!a->used && !b->used)
            continue;
        if (a->used != b->used) {
            fail("fd %d %s", fd, a->used ? "missing" : "unexpected (leaked by the restore?)");
            continue;
        }
        CHECK(strcmp(a->path, b->path) == 0, "fd %d is '%s', want '%s'", fd, b->path, a->path);
        CHECK(a->fl == b->fl, "fd %d F_GETFL %o, want %o", fd, b->fl, a->fl);
        CHECK(a->fdfl == b->fdfl, "fd %d F_GETFD %d, want %d", fd, b->fdfl, a->fdfl);
    }

    /* offsets */
    CHECK(pos(fd_ro) == 1000, "ro.dat offset %lld", (long long)pos(fd_ro));
    CHECK(pos(fd_rw) == 5000, "rw.dat offset %lld", (long long)pos(fd_rw));
    CHECK(pos(fd_cx) == 10, "cloexec.dat offset %lld", (long long)pos(fd_cx));
    CHECK(pos(fd_high) == 7, "fd 200 offset %lld", (long long)pos(fd_high));

    /* explicit flags */
    CHECK((fcntl(fd_app, F_GETFL) & (O_ACCMODE | O_APPEND)) == (O_WRONLY | O_APPEND),
          "append.log lost O_WRONLY|O_APPEND");
    CHECK((fcntl(fd_ro, F_GETFL) & O_ACCMODE) == O_RDONLY, "ro.dat not O_RDONLY");
    CHECK((fcntl(fd_rw, F_GETFL) & O_ACCMODE) == O_RDWR, "rw.dat not O_RDWR");
    CHECK(fcntl(fd_cx, F_GETFD) == FD_CLOEXEC, "cloexec.dat lost FD_CLOEXEC");
    CHECK(fcntl(fd_ro, F_GETFD) == 0, "ro.dat gained FD_CLOEXEC");
    CHECK(fcntl(fd_null, F_GETFL) & O_NONBLOCK, "/dev/null lost O_NONBLOCK");

    /* reads */
    unsigned char b[16];
    CHECK(read(fd_ro, b, 16) == 16 && memcmp(b, ro_content + 1000, 16) == 0,
          "read at ro.dat offset 1000 returned wrong bytes");
    CHECK(read(fd_high, b, 4) == 4 && memcmp(b, high_content + 7, 4) == 0,
          "read at fd 200 offset 7 returned wrong bytes");
    CHECK(read(fd_cx, b, 2) == 2, "read cloexec.dat");

    /* writes land at the restored offsets */
    CHECK(write(fd_app, "after\n", 6) == 6, "write append.log: %s", strerror(errno));
    check_file_equals("append.log", "before\nafter\n");
    CHECK(write(fd_rw, "XYZ", 3) == 3, "write rw.dat");
    CHECK(pread(fd_rw, b, 3, 5000) == 3 && memcmp(b, "XYZ", 3) == 0,
          "write to rw.dat did not land at offset 5000");
    CHECK(pos(fd_dup) == 5003,
          "dup'd fd offset %lld after writing through the original: the two no longer "
          "share one open file description",
          (long long)pos(fd_dup));

    /* devices */
    struct stat st;
    CHECK(fstat(fd_null, &st) == 0 && S_ISCHR(st.st_mode) && st.st_rdev == makedev(1, 3),
          "fd %d is not /dev/null", fd_null);
    CHECK(write(fd_null, "x", 1) == 1, "write /dev/null");
    CHECK(fstat(fd_zero, &st) == 0 && S_ISCHR(st.st_mode) && st.st_rdev == makedev(1, 5),
          "fd %d is not /dev/zero", fd_zero);
    memset(b, 0xff, sizeof(b));
    CHECK(read(fd_zero, b, 16) == 16 && all_zero(b, 16), "read /dev/zero");

    /* process attributes */
    char cwd[4096] = "";
    CHECK(getcwd(cwd, sizeof(cwd)) && strcmp(cwd, saved_cwd) == 0, "cwd '%s' want '%s'", cwd,
          saved_cwd);
    mode_t um = umask(0);
    umask(um);
    CHECK(um == 027, "umask %03o want 027", (unsigned)um);
    for (int r = 0; r < RLIM_NLIMITS; r++) {
        struct rlimit rl;
        getrlimit(r, &rl);
        CHECK(rl.rlim_cur == saved_rl[r].rlim_cur && rl.rlim_max == saved_rl[r].rlim_max,
              "rlimit %d is %llu/%llu want %llu/%llu", r, (unsigned long long)rl.rlim_cur,
              (unsigned long long)rl.rlim_max, (unsigned long long)saved_rl[r].rlim_cur,
              (unsigned long long)saved_rl[r].rlim_max);
    }
    char comm[32] = "";
    prctl(PR_GET_NAME, comm);
    CHECK(strcmp(comm, "ckfiles") == 0, "comm '%s'", comm);
    int pers = personality(0xffffffff);
    CHECK(pers == saved_pers, "personality %x want %x", pers, saved_pers);
    if (saved_sid == saved_pid)
        CHECK(getsid(0) == getpid(), "session leader lost (sid %d)", (int)getsid(0));
    if (saved_pgid == saved_pid)
        CHECK(getpgrp() == getpid(), "process group leader lost (pgid %d)", (int)getpgrp());
    finish("");
}

int main(void)
{
    SETUP_CHECK(prctl(PR_SET_NAME, "ckfiles") == 0, "PR_SET_NAME");
    SETUP_CHECK(getcwd(saved_cwd, sizeof(saved_cwd)) != NULL, "getcwd");

    make_file("ro.dat", ro_content, sizeof(ro_content), 1);
    unsigned char tmp[8192];
    make_file("rw.dat", tmp, sizeof(tmp), 2);
    make_file("cloexec.dat", tmp, 4096, 3);
    make_file("high.dat", high_content, sizeof(high_content), 4);

    fd_ro = open("ro.dat", O_RDONLY);
    SETUP_CHECK(fd_ro >= 0 && lseek(fd_ro, 1000, SEEK_SET) == 1000, "ro.dat");
    fd_app = open("append.log", O_WRONLY | O_APPEND | O_CREAT | O_TRUNC, 0644);
    SETUP_CHECK(fd_app >= 0 && write(fd_app, "before\n", 7) == 7, "append.log");
    fd_rw = open("rw.dat", O_RDWR);
    SETUP_CHECK(fd_rw >= 0 && lseek(fd_rw, 5000, SEEK_SET) == 5000, "rw.dat");
    fd_cx = open("cloexec.dat", O_RDONLY | O_CLOEXEC);
    SETUP_CHECK(fd_cx >= 0 && lseek(fd_cx, 10, SEEK_SET) == 10, "cloexec.dat");
    fd_null = open("/dev/null", O_WRONLY | O_NONBLOCK);
    SETUP_CHECK(fd_null >= 0, "/dev/null");
    fd_zero = open("/dev/zero", O_RDONLY);
    SETUP_CHECK(fd_zero >= 0, "/dev/zero");
    fd_dup = dup(fd_rw);
    SETUP_CHECK(fd_dup >= 0, "dup");
    int h = open("high.dat", O_RDWR);
    SETUP_CHECK(h >= 0 && dup2(h, fd_high) == fd_high, "dup2 200");
    close(h);
    SETUP_CHECK(lseek(fd_high, 7, SEEK_SET) == 7, "lseek 200");

    umask(027);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = 512;
    SETUP_CHECK(setrlimit(RLIMIT_NOFILE, &rl) == 0, "RLIMIT_NOFILE");
    getrlimit(RLIMIT_CORE, &rl);
    rl.rlim_cur = rl.rlim_max < (1 << 20) ? rl.rlim_max : (1 << 20);
    SETUP_CHECK(setrlimit(RLIMIT_CORE, &rl) == 0, "RLIMIT_CORE");
    int pers = personality(0xffffffff);
    SETUP_CHECK(personality((unsigned long)pers | ADDR_NO_RANDOMIZE) != -1, "personality");

    for (int r = 0; r < RLIM_NLIMITS; r++)
        getrlimit(r, &saved_rl[r]);
    saved_pers = personality(0xffffffff);
    saved_pid = getpid();
    saved_sid = getsid(0);
    saved_pgid = getpgrp();

    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    snapshot_fds(saved_fds, &nfds);

    say("READY pid=%d fds=%d umask=027 personality=%x sid=%d", (int)getpid(), nfds, saved_pers,
        (int)saved_sid);
    while (!got_usr2)
        sigsuspend(&old);
    verify();
}
