/* locks: file locks held through fds (flock, POSIX, OFD, leases).
 *
 * usage: locks [one|tree|pipe]   (run in a scratch directory: its files go in the cwd)
 *
 * one (default), one process:
 *   sh.lck   flock(LOCK_SH), plus a dup() of that fd (the same lock, one description)
 *   ex.lck   flock(LOCK_EX)
 *   posix.dat O_RDWR: POSIX write lock on bytes 100-199, read lock on bytes 300-EOF;
 *            a second, read-only fd on the same file (its own description, no lock)
 *   ofd.dat  OFD write lock on bytes 0-49, OFD read lock on bytes 1000-1999
 *   rlease.dat O_RDONLY with a read lease; wlease.dat O_RDWR with a write lease
 *   READY pid=
 * tree: the root opens tree.lck (flock LOCK_EX), tree.ofd (OFD write lock on bytes
 *   0-9) and child.dat (POSIX write lock on bytes 20-29), then forks a child that
 *   shares the three descriptions and takes its own POSIX write lock on bytes 0-9 of
 *   child.dat through the inherited fd.
 *   READY pid= child=
 * pipe: flock on the read end of a pipe (a dump must refuse it). READY pid=
 *
 * On SIGUSR2 (the root passes it on to the child and waits for it), each process
 * checks that it still holds its locks — seen from another open file description of
 * the same file, which its flock and OFD locks conflict with (and its POSIX locks
 * too, for F_OFD_GETLK: another owner) — then releases each and takes it again
 * (LOCK_NB, F_SETLK: a lock the restore left to someone else would fail), and
 * checks the leases (F_GETLEASE). The tree's child also proves its flock is the
 * root's (one description): after its LOCK_UN a new description gets LOCK_EX.
 * VERIFY OK pid=   or   VERIFY FAIL pid= reason=
 */
#include "wl.h"

#include <sys/file.h>
#include <sys/wait.h>

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static int open_file(const char *path, int flags)
{
    int fd = open(path, flags | O_CREAT, 0644);
    SETUP_CHECK(fd >= 0, path);
    return fd;
}

static int set_lock(int fd, int cmd, short type, off_t start, off_t len)
{
    struct flock fl;
    memset(&fl, 0, sizeof(fl));
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = start;
    fl.l_len = len;
    return fcntl(fd, cmd, &fl);
}

/* The lock another owner (a new description, OFD) finds on [start, start+len) when
   asking for `type`: its l_type (F_UNLCK: none) and l_pid. The probing fds stay open:
   closing any fd of a file drops the process's POSIX locks on it. */
static short probe(const char *path, short type, off_t start, off_t len, pid_t *pid)
{
    static struct {
        const char *path;
        int fd;
    } probes[8];
    int fd = -1;
    for (int i = 0; i < 8 && fd < 0; i++) {
        if (!probes[i].path) {
            probes[i].path = path;
            probes[i].fd = open(path, O_RDWR);
        }
        if (strcmp(probes[i].path, path) == 0)
            fd = probes[i].fd;
    }
    if (fd < 0)
        return -1;
    struct flock fl;
    memset(&fl, 0, sizeof(fl));
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = start;
    fl.l_len = len;
    int r = fcntl(fd, F_OFD_GETLK, &fl);
    if (r < 0)
        return -1;
    *pid = fl.l_pid;
    return fl.l_type;
}

/* Can a new description of path take flock `op`? (0: yes, and it is released again) */
static int flock_free(const char *path, int op)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return -1;
    int r = flock(fd, op | LOCK_NB);
    close(fd);
    return r;
}

static void check_posix(const char *path, short want, off_t start, off_t len, pid_t owner)
{
    pid_t pid = 0;
    short got = probe(path, F_WRLCK, start, len, &pid);
    CHECK(got == want && pid == owner, "%s bytes %lld+%lld: lock %d by %d, want %d by %d", path,
          (long long)start, (long long)len, got, (int)pid, want, (int)owner);
}

static void retake_posix(int fd, int cmd, short type, off_t start, off_t len, const char *what)
{
    CHECK(set_lock(fd, cmd, F_UNLCK, start, len) == 0, "unlock %s: %s", what, strerror(errno));
    CHECK(set_lock(fd, cmd, type, start, len) == 0, "re-lock %s: %s", what, strerror(errno));
}

static void retake_flock(int fd, int op, const char *what)
{
    CHECK(flock(fd, LOCK_UN) == 0, "LOCK_UN %s: %s", what, strerror(errno));
    CHECK(flock(fd, op | LOCK_NB) == 0, "re-flock %s: %s", what, strerror(errno));
}

static void wait_usr2(sigset_t *old)
{
    while (!got_usr2)
        sigsuspend(old);
}

static int one(void)
{
    int sh = open_file("sh.lck", O_RDONLY), ex = open_file("ex.lck", O_RDONLY);
    SETUP_CHECK(flock(sh, LOCK_SH | LOCK_NB) == 0, "flock sh");
    SETUP_CHECK(flock(ex, LOCK_EX | LOCK_NB) == 0, "flock ex");
    int shdup = dup(sh);
    SETUP_CHECK(shdup >= 0, "dup");
    int px = open_file("posix.dat", O_RDWR), pro = open_file("posix.dat", O_RDONLY);
    SETUP_CHECK(set_lock(px, F_SETLK, F_WRLCK, 100, 100) == 0, "posix write lock");
    SETUP_CHECK(set_lock(px, F_SETLK, F_RDLCK, 300, 0) == 0, "posix read lock");
    int ofd = open_file("ofd.dat", O_RDWR);
    SETUP_CHECK(set_lock(ofd, F_OFD_SETLK, F_WRLCK, 0, 50) == 0, "ofd write lock");
    SETUP_CHECK(set_lock(ofd, F_OFD_SETLK, F_RDLCK, 1000, 1000) == 0, "ofd read lock");
    int rl = open_file("rlease.dat", O_RDONLY);
    SETUP_CHECK(fcntl(rl, F_SETLEASE, F_RDLCK) == 0, "read lease");
    int wl = open_file("wlease.dat", O_RDWR);
    SETUP_CHECK(fcntl(wl, F_SETLEASE, F_WRLCK) == 0, "write lease");

    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    say("READY pid=%d", (int)getpid());
    wait_usr2(&old);

    pid_t me = getpid(), pid;
    /* held, as they were (another description conflicts with them) */
    CHECK(flock_free("sh.lck", LOCK_EX) < 0 && errno == EWOULDBLOCK, "sh.lck not locked");
    CHECK(flock_free("sh.lck", LOCK_SH) == 0, "sh.lck locked exclusively");
    CHECK(flock_free("ex.lck", LOCK_SH) < 0 && errno == EWOULDBLOCK, "ex.lck not locked");
    check_posix("posix.dat", F_WRLCK, 100, 100, me);
    check_posix("posix.dat", F_RDLCK, 300, 0, me);
    check_posix("posix.dat", F_UNLCK, 200, 100, 0);
    check_posix("posix.dat", F_UNLCK, 0, 100, 0);
    CHECK(probe("posix.dat", F_RDLCK, 300, 1, &pid) == F_UNLCK, "posix.dat 300: not a read lock");
    check_posix("ofd.dat", F_WRLCK, 0, 50, -1);
    check_posix("ofd.dat", F_RDLCK, 1000, 1000, -1);
    check_posix("ofd.dat", F_UNLCK, 50, 950, 0);
    check_posix("ofd.dat", F_UNLCK, 2000, 0, 0);
    CHECK(fcntl(rl, F_GETLEASE) == F_RDLCK, "rlease.dat lease %d", fcntl(rl, F_GETLEASE));
    CHECK(fcntl(wl, F_GETLEASE) == F_WRLCK, "wlease.dat lease %d", fcntl(wl, F_GETLEASE));
    /* and still ours to release and take again */
    retake_flock(shdup, LOCK_SH, "sh.lck");
    retake_flock(ex, LOCK_EX, "ex.lck");
    retake_posix(px, F_SETLK, F_WRLCK, 100, 100, "posix.dat 100-199");
    retake_posix(px, F_SETLK, F_RDLCK, 300, 0, "posix.dat 300-");
    retake_posix(ofd, F_OFD_SETLK, F_WRLCK, 0, 50, "ofd.dat 0-49");
    retake_posix(ofd, F_OFD_SETLK, F_RDLCK, 1000, 1000, "ofd.dat 1000-1999");
    CHECK(fcntl(wl, F_SETLEASE, F_UNLCK) == 0 && fcntl(wl, F_SETLEASE, F_WRLCK) == 0,
          "re-lease wlease.dat: %s", strerror(errno));
    /* closing the unlocked fd of posix.dat drops the process's POSIX locks on it */
    close(pro);
    check_posix("posix.dat", F_UNLCK, 0, 0, 0);
    finish("");
}

static int tree(void)
{
    int tl = open_file("tree.lck", O_RDONLY);
    SETUP_CHECK(flock(tl, LOCK_EX | LOCK_NB) == 0, "flock tree.lck");
    int to = open_file("tree.ofd", O_RDWR);
    SETUP_CHECK(set_lock(to, F_OFD_SETLK, F_WRLCK, 0, 10) == 0, "ofd lock tree.ofd");
    int cd = open_file("child.dat", O_RDWR);
    SETUP_CHECK(set_lock(cd, F_SETLK, F_WRLCK, 20, 10) == 0, "posix lock child.dat");
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    int ready[2];
    SETUP_CHECK(pipe(ready) == 0, "pipe");
    pid_t child = fork();
    SETUP_CHECK(child >= 0, "fork");
    if (child == 0) {
        close(ready[0]);
        SETUP_CHECK(set_lock(cd, F_SETLK, F_WRLCK, 0, 10) == 0, "child's posix lock");
        SETUP_CHECK(write(ready[1], "x", 1) == 1, "ready");
        close(ready[1]);
        wait_usr2(&old);
        pid_t me = getpid(), root = getppid();
        check_posix("child.dat", F_WRLCK, 0, 10, me);
        check_posix("child.dat", F_WRLCK, 20, 10, root);
        check_posix("tree.ofd", F_WRLCK, 0, 10, -1);
        CHECK(flock_free("tree.lck", LOCK_SH) < 0, "tree.lck not locked");
        /* the flock is the root's too: one LOCK_UN here releases it for both */
        CHECK(flock(tl, LOCK_UN) == 0, "LOCK_UN tree.lck");
        CHECK(flock_free("tree.lck", LOCK_EX) == 0, "tree.lck still locked after LOCK_UN "
              "(two descriptions, not one shared)");
        CHECK(flock(tl, LOCK_EX | LOCK_NB) == 0, "re-flock tree.lck: %s", strerror(errno));
        retake_posix(cd, F_SETLK, F_WRLCK, 0, 10, "child.dat 0-9");
        finish("role=child");
    }
    close(ready[1]);
    char c;
    SETUP_CHECK(read(ready[0], &c, 1) == 1, "child ready");
    close(ready[0]);
    say("READY pid=%d child=%d", (int)getpid(), (int)child);
    wait_usr2(&old);
    kill(child, SIGUSR2);
    int status;
    CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0,
          "child %d failed (status %#x)", (int)child, status);
    pid_t me = getpid();
    check_posix("child.dat", F_WRLCK, 20, 10, me);
    check_posix("child.dat", F_UNLCK, 0, 10, 0); /* the child's went with it */
    check_posix("tree.ofd", F_WRLCK, 0, 10, -1);
    CHECK(flock_free("tree.lck", LOCK_SH) < 0, "tree.lck not locked after the child");
    retake_posix(cd, F_SETLK, F_WRLCK, 20, 10, "child.dat 20-29");
    retake_posix(to, F_OFD_SETLK, F_WRLCK, 0, 10, "tree.ofd 0-9");
    retake_flock(tl, LOCK_EX, "tree.lck");
    finish("role=root");
}

static int on_pipe(void)
{
    int p[2];
    SETUP_CHECK(pipe(p) == 0, "pipe");
    SETUP_CHECK(flock(p[0], LOCK_EX | LOCK_NB) == 0, "flock pipe");
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    say("READY pid=%d", (int)getpid());
    wait_usr2(&old);
    CHECK(flock(p[0], LOCK_UN) == 0, "LOCK_UN pipe");
    finish("");
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "one";
    if (strcmp(mode, "tree") == 0)
        return tree();
    if (strcmp(mode, "pipe") == 0)
        return on_pipe();
    return one();
}
