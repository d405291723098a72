/* procfiles: files and directories of /proc/PID held open, checked from inside after
 * a restore (possibly under new PIDs: they must name the restored processes).
 *
 * usage: procfiles           (run in a scratch directory; the child runs in ./kids)
 *        procfiles outside   (refused: /proc/1/stat, a process outside the dump)
 *        procfiles thread    (refused: /proc/self/task/TID/stat of another thread)
 * READY pid= fd= child=   then waits in sigsuspend() until SIGUSR2, then checks and prints
 * VERIFY OK pid=  (exit 0)  or  VERIFY FAIL pid= reason=  (exit 1)
 *
 * Set up: /proc/self/status read 50 bytes in; /proc/CHILD/stat of a child; the
 * /proc/self/fd directory read part way (readdir goes on after the restore with
 * exactly the entries that were left: the same fds are open again); a second one
 * read to the end, listing them all; /proc/self/task/PID/comm (the main thread's);
 * /proc/self/mem O_RDWR positioned at a variable; /proc/self (a directory, O_PATH).
 * Checked: flags, FD_CLOEXEC, offsets; status names this process (Pid: getpid());
 * the child's stat names the current child; the directory goes on; comm is ours;
 * mem reads and writes this process's memory; the O_PATH fd is this /proc/PID.
 */
#include "wl.h"

#include <dirent.h>
#include <sys/wait.h>

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

enum { STATUS, CHILD_STAT, DIR_PART, DIR_ALL, COMM, MEM, SELF_PATH, N };
static int fds[N], fl[N], fdfl[N];
static off_t pos[N];
static pid_t child;
static volatile uint64_t target_var = 0x1122334455667788ULL;

struct linux_dirent64 {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

/* Names a getdents64 read from fd yields until the end ("." and ".." left out). */
static int read_names(int fd, char names[][16], int max)
{
    char buf[4096];
    int n = 0;
    for (;;) {
        long got = syscall(SYS_getdents64, fd, buf, sizeof(buf));
        if (got <= 0)
            return n;
        for (long off = 0; off < got;) {
            struct linux_dirent64 *d = (struct linux_dirent64 *)(buf + off);
            if (strcmp(d->d_name, ".") && strcmp(d->d_name, "..") && n < max)
                snprintf(names[n++], 16, "%s", d->d_name);
            off += d->d_reclen;
        }
    }
}

static char all_names[64][16];
static int n_all;
static int skipped; /* entries of the fd directory read before the dump (after . and ..) */

static void setup(void)
{
    SETUP_CHECK(mkdir("kids", 0755) == 0, "mkdir kids");
    child = fork();
    SETUP_CHECK(child >= 0, "fork");
    if (child == 0) {
        SETUP_CHECK(chdir("kids") == 0, "chdir");
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGUSR2, SIG_DFL);
        for (;;)
            pause();
    }
    char path[64], buf[64];
    fds[STATUS] = open("/proc/self/status", O_RDONLY);
    SETUP_CHECK(fds[STATUS] >= 0 && read(fds[STATUS], buf, 50) == 50, "status");
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)child);
    fds[CHILD_STAT] = open(path, O_RDONLY | O_CLOEXEC);
    SETUP_CHECK(fds[CHILD_STAT] >= 0, "child stat");
    snprintf(path, sizeof(path), "/proc/self/task/%d/comm", (int)getpid());
    fds[COMM] = open(path, O_RDONLY);
    fds[MEM] = open("/proc/self/mem", O_RDWR | O_CLOEXEC);
    fds[SELF_PATH] = open("/proc/self", O_PATH | O_DIRECTORY);
    SETUP_CHECK(fds[COMM] >= 0 && fds[MEM] >= 0 && fds[SELF_PATH] >= 0, "open");
    SETUP_CHECK(lseek(fds[MEM], (off_t)(uintptr_t)&target_var, SEEK_SET) ==
                    (off_t)(uintptr_t)&target_var,
                "seek mem");
    fds[DIR_PART] = open("/proc/self/fd", O_RDONLY | O_DIRECTORY);
    fds[DIR_ALL] = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    SETUP_CHECK(fds[DIR_PART] >= 0 && fds[DIR_ALL] >= 0, "open fd dirs");
    n_all = read_names(fds[DIR_ALL], all_names, 64);
    /* read ".", "..", and the first three fds: a buffer that holds five small records */
    char small[5 * 24];
    long got = syscall(SYS_getdents64, fds[DIR_PART], small, sizeof(small));
    SETUP_CHECK(got > 0, "getdents");
    for (long off = 0; off < got;) {
        struct linux_dirent64 *d = (struct linux_dirent64 *)(small + off);
        if (strcmp(d->d_name, ".") && strcmp(d->d_name, ".."))
            skipped++;
        off += d->d_reclen;
    }
    SETUP_CHECK(skipped > 0 && skipped < n_all, "a directory read part way");
    for (int i = 0; i < N; i++) {
        fl[i] = fcntl(fds[i], F_GETFL);
        fdfl[i] = fcntl(fds[i], F_GETFD);
        pos[i] = i == SELF_PATH ? 0 : lseek(fds[i], 0, SEEK_CUR);
    }
}

/* The pid of our one child (it may have a new one after a --new-pid restore). */
static long current_child(void)
{
    char path[64], *buf;
    snprintf(path, sizeof(path), "/proc/self/task/%d/children", (int)getpid());
    if (read_file(path, &buf) < 0)
        return -1;
    long v = strtol(buf, NULL, 10);
    free(buf);
    return v;
}

static void verify(void)
{
    for (int i = 0; i < N; i++) {
        int f = fcntl(fds[i], F_GETFL), d = fcntl(fds[i], F_GETFD);
        CHECK(f == fl[i], "fd %d: F_GETFL %o, want %o", fds[i], f, fl[i]);
        CHECK(d == fdfl[i], "fd %d: F_GETFD %d, want %d", fds[i], d, fdfl[i]);
        if (i != SELF_PATH && i != DIR_PART)
            CHECK(lseek(fds[i], 0, SEEK_CUR) == pos[i], "fd %d at %ld, want %ld", fds[i],
                  (long)lseek(fds[i], 0, SEEK_CUR), (long)pos[i]);
    }
    /* the fd directory goes on where it was: exactly the entries that were left */
    char rest[64][16];
    int n = read_names(fds[DIR_PART], rest, 64);
    int same = n == n_all - skipped;
    for (int i = 0; same && i < n; i++)
        same = strcmp(rest[i], all_names[skipped + i]) == 0;
    CHECK(same, "the fd directory went on with %d entries (%s...), want %d (%s...)", n,
          n ? rest[0] : "-", n_all - skipped, all_names[skipped]);

    char buf[4096];
    ssize_t r = pread(fds[STATUS], buf, sizeof(buf) - 1, 0);
    buf[r < 0 ? 0 : r] = 0;
    char want[64];
    snprintf(want, sizeof(want), "\nPid:\t%d\n", (int)getpid());
    CHECK(strstr(buf, want) != NULL, "status does not say %s", want + 1);

    r = pread(fds[CHILD_STAT], buf, sizeof(buf) - 1, 0);
    buf[r < 0 ? 0 : r] = 0;
    long kid = current_child();
    CHECK(kid > 0 && strtol(buf, NULL, 10) == kid, "the child's stat names %ld, the child is %ld",
          strtol(buf, NULL, 10), kid);

    r = pread(fds[COMM], buf, sizeof(buf) - 1, 0);
    buf[r < 0 ? 0 : r] = 0;
    char comm[32] = {0};
    char *mine;
    if (read_file("/proc/self/comm", &mine) >= 0) {
        snprintf(comm, sizeof(comm), "%s", mine);
        free(mine);
    }
    CHECK(r > 0 && strcmp(buf, comm) == 0, "comm reads '%s', want '%s'", buf, comm);

    uint64_t v = 0;
    CHECK(read(fds[MEM], &v, 8) == 8 && v == target_var, "mem reads %llx, want %llx",
          (unsigned long long)v, (unsigned long long)target_var);
    uint64_t nv = 0xa5a5a5a5a5a5a5a5ULL;
    CHECK(pwrite(fds[MEM], &nv, 8, (off_t)(uintptr_t)&target_var) == 8 && target_var == nv,
          "a write through mem did not reach this process");

    struct stat a, b;
    snprintf(want, sizeof(want), "/proc/%d", (int)getpid());
    CHECK(fstat(fds[SELF_PATH], &a) == 0 && stat(want, &b) == 0 && a.st_ino == b.st_ino,
          "the O_PATH fd is not %s", want);
    kill((pid_t)kid, SIGKILL);
    waitpid((pid_t)kid, NULL, 0);
}

/* ------------------------------------------------------------------ refused */

static volatile pid_t thread_tid;
static void *idle(void *arg)
{
    (void)arg;
    thread_tid = (pid_t)syscall(SYS_gettid);
    for (;;)
        pause();
    return NULL;
}

#include <pthread.h>

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "all";
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    int refused = -1;
    if (!strcmp(mode, "outside")) {
        refused = open("/proc/1/stat", O_RDONLY);
        SETUP_CHECK(refused >= 0, "open /proc/1/stat");
    } else if (!strcmp(mode, "thread")) {
        pthread_t t;
        SETUP_CHECK(pthread_create(&t, NULL, idle, NULL) == 0, "pthread_create");
        while (!thread_tid)
            usleep(1000);
        char path[64];
        snprintf(path, sizeof(path), "/proc/self/task/%d/stat", (int)thread_tid);
        refused = open(path, O_RDONLY);
        SETUP_CHECK(refused >= 0, "open the thread's stat");
    } else {
        setup();
    }
    say("READY pid=%d fd=%d child=%d", (int)getpid(), refused, (int)child);
    while (!got_usr2)
        sigsuspend(&old);
    if (refused < 0)
        verify();
    finish("");
}
