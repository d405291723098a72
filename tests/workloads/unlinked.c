/* unlinked: regular files unlinked while still open or mapped.
 *
 * usage: unlinked [MODE]   (run in a scratch directory: its files are made there)
 *   all      (default) the setups below, in one process
 *   tree     the same, plus a child that inherited them and opened one of its own
 *   sub      one unlinked file in ./sub (the test removes ./sub before the restore)
 *   big      (refused) an unlinked file with 65 MiB of data
 *   links    (refused) an open file whose name was removed while another link remains
 *   nodir    (refused) an unlinked file whose directory was removed too
 *   aio      (refused) an AIO ring (io_setup)
 * READY pid= fd= child=   then waits in sigsuspend() until SIGUSR2, then checks and prints
 * VERIFY OK pid=  (exit 0)  or  VERIFY FAIL pid= reason=  (exit 1)
 *
 * Set up ("all"), every file unlinked afterwards:
 *   a.dat   mode 0640, 5 pages with a hole in the middle: fd A O_RDWR at offset 5000
 *           and a dup of it, fd A2 O_RDONLY|O_CLOEXEC at offset 100 (another
 *           description), a MAP_SHARED writable mapping written through, a MAP_PRIVATE
 *           mapping with one page changed (copy-on-write)
 *   b.log   O_WRONLY|O_APPEND holding "hello\n"
 *   c.map   only a MAP_SHARED mapping holds it (its fd closed)
 *   e.path  an O_PATH fd
 * Checked after SIGUSR2: no name came back; each fd: nlink 0, same inode as its other
 * fds and mappings (a write through one is seen through the others), content, size,
 * mode, owner, flags, FD_CLOEXEC, offset (shared with the dup); the private page kept;
 * appends land at the end; /proc/self/fd names a file of this directory, "(deleted)".
 */
#include "wl.h"

#include <sys/mman.h>
#include <sys/wait.h>

#define PG 4096
#define NPAGES 5

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static int fa, fa_dup, fa2, fb, fe;
static unsigned char *shared_a, *private_a, *map_c;
static unsigned char want_a[NPAGES * PG], want_c[2 * PG];
static int fl[5], fdfl[5];
static ino_t ino_a, ino_c;
static pid_t child;
static char cwd[4096];

static int *fds_checked[5] = {&fa, &fa_dup, &fa2, &fb, &fe};

static void must_write(int fd, const void *buf, size_t len, off_t off)
{
    SETUP_CHECK(pwrite(fd, buf, len, off) == (ssize_t)len, "pwrite");
}

static void setup(void)
{
    SETUP_CHECK(getcwd(cwd, sizeof(cwd)) != NULL, "getcwd");
    /* a.dat: pages 0, 1 and 4 hold data, 2 and 3 are a hole */
    fa = open("a.dat", O_RDWR | O_CREAT | O_EXCL, 0640);
    SETUP_CHECK(fa >= 0, "open a.dat");
    SETUP_CHECK(fchmod(fa, 0640) == 0, "fchmod");
    fill(want_a, 2 * PG, 11);
    fill(want_a + 4 * PG, PG, 12);
    must_write(fa, want_a, 2 * PG, 0);
    must_write(fa, want_a + 4 * PG, PG, 4 * PG);
    fa2 = open("a.dat", O_RDONLY | O_CLOEXEC);
    SETUP_CHECK(fa2 >= 0, "open a.dat again");
    fa_dup = dup(fa);
    shared_a = mmap(NULL, NPAGES * PG, PROT_READ | PROT_WRITE, MAP_SHARED, fa, 0);
    private_a = mmap(NULL, NPAGES * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fa2, 0);
    SETUP_CHECK(shared_a != MAP_FAILED && private_a != MAP_FAILED, "mmap a");
    memcpy(shared_a + PG + 7, "through the mapping", 19); /* in the file's content */
    memcpy(want_a + PG + 7, "through the mapping", 19);
    memset(private_a + 4 * PG, 0x5a, 100); /* copy-on-write: this process's page only */
    SETUP_CHECK(lseek(fa, 5000, SEEK_SET) == 5000 && lseek(fa2, 100, SEEK_SET) == 100, "seek");
    SETUP_CHECK(unlink("a.dat") == 0, "unlink a.dat");

    fb = open("b.log", O_WRONLY | O_APPEND | O_CREAT | O_EXCL, 0600);
    SETUP_CHECK(fb >= 0 && write(fb, "hello\n", 6) == 6 && unlink("b.log") == 0, "b.log");

    int fc = open("c.map", O_RDWR | O_CREAT | O_EXCL, 0600);
    SETUP_CHECK(fc >= 0 && ftruncate(fc, 2 * PG) == 0, "c.map");
    fill(want_c, PG, 13);
    memset(want_c + PG, 0, PG);
    map_c = mmap(NULL, 2 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, fc, 0);
    SETUP_CHECK(map_c != MAP_FAILED, "mmap c");
    memcpy(map_c, want_c, PG);
    struct stat st;
    SETUP_CHECK(fstat(fc, &st) == 0, "fstat c");
    ino_c = st.st_ino;
    close(fc);
    SETUP_CHECK(unlink("c.map") == 0, "unlink c.map");

    int fe0 = open("e.path", O_RDWR | O_CREAT | O_EXCL, 0600);
    SETUP_CHECK(fe0 >= 0 && write(fe0, "e", 1) == 1, "e.path");
    close(fe0);
    fe = open("e.path", O_PATH);
    SETUP_CHECK(fe >= 0 && unlink("e.path") == 0, "O_PATH e.path");

    SETUP_CHECK(fstat(fa, &st) == 0, "fstat a");
    ino_a = st.st_ino;
    for (int i = 0; i < 5; i++) {
        fl[i] = fcntl(*fds_checked[i], F_GETFL);
        fdfl[i] = fcntl(*fds_checked[i], F_GETFD);
    }
}

static ino_t ino_of(int fd)
{
    struct stat st;
    return fstat(fd, &st) == 0 ? st.st_ino : 0;
}

/* The inode a mapping maps, through /proc/self/map_files (0: none). */
static ino_t mapped_ino(void *p, size_t len)
{
    char path[128];
    snprintf(path, sizeof(path), "/proc/self/map_files/%lx-%lx", (unsigned long)p,
             (unsigned long)p + len);
    struct stat st;
    return stat(path, &st) == 0 && st.st_nlink == 0 ? st.st_ino : 0;
}

static void verify_names(void)
{
    const char *names[] = {"a.dat", "b.log", "c.map", "e.path"};
    for (int i = 0; i < 4; i++)
        CHECK(access(names[i], F_OK) != 0 && errno == ENOENT, "%s has a name again", names[i]);
    char link[64], target[4200];
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fa);
    ssize_t n = readlink(link, target, sizeof(target) - 1);
    target[n < 0 ? 0 : n] = 0;
    size_t cl = strlen(cwd);
    CHECK(n > 0 && strncmp(target, cwd, cl) == 0 && target[cl] == '/' &&
              strstr(target, " (deleted)") != NULL && !strchr(target + cl + 1, '/'),
          "fd %d is '%s', not an unlinked file of %s", fa, target, cwd);
}

static void verify(void)
{
    verify_names();
    for (int i = 0; i < 5; i++) {
        int f = fcntl(*fds_checked[i], F_GETFL), d = fcntl(*fds_checked[i], F_GETFD);
        CHECK(f == fl[i], "fd %d: F_GETFL %o, want %o", *fds_checked[i], f, fl[i]);
        CHECK(d == fdfl[i], "fd %d: F_GETFD %d, want %d", *fds_checked[i], d, fdfl[i]);
    }
    struct stat st;
    CHECK(fstat(fa, &st) == 0 && st.st_nlink == 0 && st.st_size == NPAGES * PG &&
              (st.st_mode & 07777) == 0640 && st.st_uid == getuid() && st.st_gid == getgid(),
          "a.dat: nlink %lu size %ld mode %o uid %d", (unsigned long)st.st_nlink,
          (long)st.st_size, st.st_mode & 07777, (int)st.st_uid);
    ino_t a = ino_of(fa);
    CHECK(ino_of(fa2) == a && ino_of(fa_dup) == a, "a.dat's fds are not one file");
    CHECK(mapped_ino(shared_a, NPAGES * PG) == a && mapped_ino(private_a, NPAGES * PG) == a,
          "a.dat's mappings are not of its fds' file");
    CHECK(lseek(fa, 0, SEEK_CUR) == 5000 && lseek(fa2, 0, SEEK_CUR) == 100,
          "offsets %ld %ld, want 5000 100", (long)lseek(fa, 0, SEEK_CUR),
          (long)lseek(fa2, 0, SEEK_CUR));
    lseek(fa, 6000, SEEK_SET);
    CHECK(lseek(fa_dup, 0, SEEK_CUR) == 6000, "the dup does not share the offset");
    static unsigned char got[NPAGES * PG];
    CHECK(pread(fa2, got, sizeof(got), 0) == (ssize_t)sizeof(got) &&
              memcmp(got, want_a, sizeof(got)) == 0,
          "a.dat's content differs");
    CHECK(memcmp(shared_a, want_a, sizeof(want_a)) == 0, "the shared mapping's content differs");
    /* (a page of the private mapping it never wrote is the file's, until it writes) */
    CHECK(memcmp(private_a, want_a, 2 * PG) == 0, "the private mapping's file pages differ");
    /* one inode: a write through the fd shows in the mapping and the other way round */
    CHECK(pwrite(fa, "via fd", 6, 3 * PG) == 6 && memcmp(shared_a + 3 * PG, "via fd", 6) == 0,
          "a write through fd A does not show in the shared mapping");
    memcpy(shared_a + 10, "via map", 7);
    CHECK(pread(fa2, got, 7, 10) == 7 && memcmp(got, "via map", 7) == 0,
          "a write through the mapping does not show through fd A2");
    unsigned char priv[100];
    memset(priv, 0x5a, sizeof(priv));
    CHECK(memcmp(private_a + 4 * PG, priv, 100) == 0 &&
              memcmp(private_a + 4 * PG + 100, want_a + 4 * PG + 100, PG - 100) == 0,
          "the private mapping's changed page is not kept");

    CHECK(fstat(fb, &st) == 0 && st.st_nlink == 0 && (st.st_mode & 07777) == 0600, "b.log");
    CHECK(write(fb, "world\n", 6) == 6, "append to b.log");
    char buf[32] = {0};
    char bpath[64];
    snprintf(bpath, sizeof(bpath), "/proc/self/fd/%d", fb);
    int rb = open(bpath, O_RDONLY);
    CHECK(rb >= 0 && read(rb, buf, sizeof(buf)) == 12 && memcmp(buf, "hello\nworld\n", 12) == 0,
          "b.log holds '%s'", buf);
    if (rb >= 0)
        close(rb);

    CHECK(mapped_ino(map_c, 2 * PG) != 0, "c.map is not an unlinked file");
    CHECK(memcmp(map_c, want_c, sizeof(want_c)) == 0, "c.map's content differs");
    CHECK(fstat(fe, &st) == 0 && st.st_nlink == 0 && st.st_size == 1, "e.path (O_PATH)");

    if (child > 0) {
        int status = 0;
        CHECK(kill(child, SIGUSR1) == 0 && waitpid(child, &status, 0) == child &&
                  WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "the child's checks failed (status %#x)", status);
    }
}

/* ------------------------------------------------------------------ the child */

static volatile sig_atomic_t child_go;
static void on_usr1(int sig)
{
    (void)sig;
    child_go = 1;
}

static int own_a; /* the child's own description of a.dat, opened through /proc */

static void child_main(void) __attribute__((noreturn));
static void child_main(void)
{
    SETUP_CHECK(chdir("kids") == 0, "chdir kids");
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fa);
    own_a = open(path, O_RDONLY);
    SETUP_CHECK(own_a >= 0 && lseek(own_a, 333, SEEK_SET) == 333, "reopen a.dat");
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    while (!child_go)
        pause();
    int ok = ino_of(own_a) == ino_of(fa) && mapped_ino(shared_a, NPAGES * PG) == ino_of(fa) &&
             lseek(own_a, 0, SEEK_CUR) == 333 && mapped_ino(map_c, 2 * PG) != 0;
    unsigned char got[8];
    /* the parent wrote "via fd" at 3 pages through its fd A before signalling */
    ok = ok && pread(own_a, got, 6, 3 * PG) == 6 && memcmp(got, "via fd", 6) == 0;
    _exit(ok ? 0 : 1);
}

/* ------------------------------------------------------------------ refused setups */

static int refused = -1;

static void setup_refused(const char *mode)
{
    if (!strcmp(mode, "big")) {
        refused = open("big.dat", O_RDWR | O_CREAT | O_EXCL, 0600);
        size_t len = 65UL << 20;
        SETUP_CHECK(refused >= 0 && ftruncate(refused, len) == 0, "big.dat");
        unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, refused, 0);
        SETUP_CHECK(p != MAP_FAILED, "mmap");
        memset(p, 0x5a, len);
        munmap(p, len);
        SETUP_CHECK(unlink("big.dat") == 0, "unlink");
    } else if (!strcmp(mode, "links")) {
        refused = open("one.dat", O_RDWR | O_CREAT | O_EXCL, 0600);
        SETUP_CHECK(refused >= 0 && link("one.dat", "two.dat") == 0 && unlink("one.dat") == 0,
                    "links");
    } else if (!strcmp(mode, "nodir") || !strcmp(mode, "sub")) {
        SETUP_CHECK(mkdir("sub", 0755) == 0, "mkdir sub");
        refused = open("sub/f.dat", O_RDWR | O_CREAT | O_EXCL, 0600);
        SETUP_CHECK(refused >= 0 && write(refused, "sub", 3) == 3 && unlink("sub/f.dat") == 0,
                    "sub/f.dat");
        if (!strcmp(mode, "nodir"))
            SETUP_CHECK(rmdir("sub") == 0, "rmdir sub");
    } else if (!strcmp(mode, "aio")) {
        unsigned long ctx = 0;
        SETUP_CHECK(syscall(SYS_io_setup, 4, &ctx) == 0, "io_setup");
    }
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "all";
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    int full = !strcmp(mode, "all") || !strcmp(mode, "tree");
    if (full) {
        setup();
        if (!strcmp(mode, "tree")) {
            SETUP_CHECK(mkdir("kids", 0755) == 0, "mkdir kids");
            child = fork();
            SETUP_CHECK(child >= 0, "fork");
            if (child == 0)
                child_main();
        }
    } else {
        setup_refused(mode);
    }
    say("READY pid=%d fd=%d child=%d", (int)getpid(), refused, (int)child);
    while (!got_usr2)
        sigsuspend(&old);
    if (full) {
        verify();
    } else {
        struct stat st;
        CHECK(refused < 0 || fstat(refused, &st) == 0, "fd %d closed", refused);
        if (!strcmp(mode, "sub")) {
            char b[4] = {0};
            CHECK(pread(refused, b, 3, 0) == 3 && !memcmp(b, "sub", 3), "sub/f.dat holds '%s'", b);
        }
    }
    finish("");
}
