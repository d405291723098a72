/* users: processes that do not run as root (restored with their credentials and limits).
 *
 * usage: users MODE
 *   self     run as started (the test starts it as nobody with setpriv); locks 1 MiB
 *   drop     start as root, lock 12 MiB (more than RLIMIT_MEMLOCK allows: root has
 *            CAP_IPC_LOCK), then become uid/gid 65534 with groups 65534,100
 *   tree     stay root and fork a child that does `drop` (a master and its worker)
 *   seccomp  like self, plus a second thread under a seccomp filter of its own that
 *            fails prctl with errno 1234
 *   threads  like self, plus four more threads (every thread must be nobody again; the
 *            restore sets the first one's credentials by injected calls and copies
 *            them to the others as one injected program each)
 *   lockall  like self, under mlockall(MCL_CURRENT|MCL_FUTURE), its locked memory
 *            filled up to 8 KiB below RLIMIT_MEMLOCK (no room for one more mapping)
 *
 * Before READY each process sets distinctive limits (RLIMIT_NOFILE soft 777,
 * RLIMIT_CORE 0/0, RLIMIT_MSGQUEUE 12345/54321) and fills 4 MiB of memory.
 * READY pid= child= uid=
 * On SIGUSR2 each checks its uids, gids, groups, limits, dumpable flag, memory, and
 * that the locked area is still locked (VmFlags lo, VmLck); the tree's root passes
 * SIGUSR2 on to its child and waits for its verdict.
 * VERIFY OK pid= uid=   or   VERIFY FAIL pid= reason=
 */
#include "wl.h"

#include <dirent.h>
#include <grp.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>

#define MIB (1024UL * 1024UL)
#define MEM (4 * MIB)
#define NOBODY 65534

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static unsigned char *mem, *locked;
static size_t locked_len;
static uint64_t mem_sum, locked_sum;
static uid_t want_uid;
static gid_t want_gid;
static gid_t want_groups[2] = {NOBODY, 100};
static int want_ngroups, want_dumpable, lockall;

struct lim {
    int res;
    const char *name;
    rlim_t soft, hard; /* RLIM_INFINITY as hard: keep the inherited one */
};
static struct lim lims[] = {
    {RLIMIT_NOFILE, "nofile", 777, RLIM_INFINITY},
    {RLIMIT_CORE, "core", 0, 0},
    {RLIMIT_MSGQUEUE, "msgqueue", 12345, 54321},
};
#define NLIMS (sizeof(lims) / sizeof(lims[0]))

static void set_limits(void)
{
    for (size_t i = 0; i < NLIMS; i++) {
        struct rlimit r;
        SETUP_CHECK(getrlimit(lims[i].res, &r) == 0, "getrlimit");
        if (lims[i].hard == RLIM_INFINITY)
            lims[i].hard = r.rlim_max;
        r.rlim_cur = lims[i].soft;
        r.rlim_max = lims[i].hard;
        SETUP_CHECK(setrlimit(lims[i].res, &r) == 0, lims[i].name);
    }
}

static void setup_memory(uint64_t seed, size_t lock_len)
{
    mem = mmap(NULL, MEM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    SETUP_CHECK(mem != MAP_FAILED, "mmap");
    fill(mem, MEM, seed);
    mem_sum = hash_mem(mem, MEM, 0);
    locked_len = lock_len;
    locked = mmap(NULL, lock_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    SETUP_CHECK(locked != MAP_FAILED, "mmap locked");
    fill(locked, lock_len, seed + 1);
    locked_sum = hash_mem(locked, lock_len, 0);
    SETUP_CHECK(mlock(locked, lock_len) == 0, "mlock");
}

static void drop_to_nobody(void)
{
    SETUP_CHECK(setgroups(2, want_groups) == 0, "setgroups");
    SETUP_CHECK(setresgid(NOBODY, NOBODY, NOBODY) == 0, "setresgid");
    SETUP_CHECK(setresuid(NOBODY, NOBODY, NOBODY) == 0, "setresuid");
}

static void remember_creds(void)
{
    want_uid = getuid();
    want_gid = getgid();
    want_ngroups = getgroups(2, want_groups);
    SETUP_CHECK(want_ngroups >= 0, "getgroups");
    want_dumpable = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0);
}

/* /proc/self/smaps: VmFlags of the area at addr contain "lo"? */
static int area_locked(uintptr_t addr)
{
    char *smaps;
    if (read_file("/proc/self/smaps", &smaps) < 0)
        return 0;
    int in = 0, lo = 0;
    for (char *line = strtok(smaps, "\n"); line; line = strtok(NULL, "\n")) {
        unsigned long s, e;
        if (sscanf(line, "%lx-%lx ", &s, &e) == 2) /* a VMA's first line */
            in = addr >= s && addr < e;
        else if (in && strncmp(line, "VmFlags:", 8) == 0)
            lo = strstr(line, " lo") != NULL;
    }
    free(smaps);
    return lo;
}

static long status_kb(const char *key)
{
    char *st;
    if (read_file("/proc/self/status", &st) < 0)
        return -1;
    long v = -1;
    char *p = strstr(st, key);
    if (p)
        v = strtol(p + strlen(key), NULL, 10);
    free(st);
    return v;
}

/* Every thread's uids (credentials belong to each thread); returns how many threads. */
static int check_threads_uid(void)
{
    DIR *d = opendir("/proc/self/task");
    if (!d)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char path[64], *st;
        snprintf(path, sizeof(path), "/proc/self/task/%s/status", e->d_name);
        if (read_file(path, &st) < 0)
            continue;
        unsigned u[4] = {0};
        char *p = strstr(st, "\nUid:");
        if (!p || sscanf(p + 5, "%u %u %u %u", &u[0], &u[1], &u[2], &u[3]) != 4 ||
            u[0] != want_uid || u[1] != want_uid || u[2] != want_uid || u[3] != want_uid)
            fail("thread%s_uid", e->d_name);
        free(st);
        n++;
    }
    closedir(d);
    return n;
}

static void check_self(void)
{
    uid_t r, e, s;
    gid_t rg, eg, sg;
    getresuid(&r, &e, &s);
    getresgid(&rg, &eg, &sg);
    CHECK(r == want_uid && e == want_uid && s == want_uid, "uids=%d,%d,%d", (int)r, (int)e,
          (int)s);
    CHECK(rg == want_gid && eg == want_gid && sg == want_gid, "gids=%d,%d,%d", (int)rg, (int)eg,
          (int)sg);
    gid_t groups[16];
    int n = getgroups(16, groups);
    CHECK(n == want_ngroups, "ngroups=%d", n);
    for (int i = 0; i < n && i < want_ngroups; i++)
        CHECK(groups[i] == want_groups[i], "group%d=%d", i, (int)groups[i]);
    for (size_t i = 0; i < NLIMS; i++) {
        struct rlimit lim;
        getrlimit(lims[i].res, &lim);
        CHECK(lim.rlim_cur == lims[i].soft && lim.rlim_max == lims[i].hard, "%s=%lld/%lld",
              lims[i].name, (long long)lim.rlim_cur, (long long)lim.rlim_max);
    }
    int nthreads = check_threads_uid();
    CHECK(nthreads >= 1, "threads=%d", nthreads);
    int d = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0);
    CHECK(d == want_dumpable, "dumpable=%d", d);
    CHECK(hash_mem(mem, MEM, 0) == mem_sum, "memory");
    CHECK(hash_mem(locked, locked_len, 0) == locked_sum, "locked_memory");
    CHECK(area_locked((uintptr_t)locked), "not_locked");
    long lck = status_kb("VmLck:");
    CHECK(lck >= (long)(locked_len / 1024), "VmLck=%ld", lck);
    /* what a process of this user can still do */
    void *p = mmap(NULL, MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(lockall || p != MAP_FAILED, "mmap_after");
    int fd = open("/proc/self/status", O_RDONLY);
    CHECK(fd >= 0, "open_own_proc");
    if (fd >= 0)
        close(fd);
}

/* ---- a second thread: plain, or under a seccomp filter of its own ------------- */

static volatile int filtered;

static void *second_thread(void *arg)
{
    if (!arg) { /* a plain thread */
        filtered = 1;
        for (;;)
            pause();
    }
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_prctl, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | 1234),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof(f) / sizeof(f[0]), f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
        syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0)
        filtered = -1;
    else
        filtered = 1;
    for (;;)
        pause();
    return NULL;
}

static void start_thread(int with_filter)
{
    pthread_t t;
    SETUP_CHECK(pthread_create(&t, NULL, second_thread, with_filter ? "f" : NULL) == 0,
                "pthread_create");
    while (!filtered)
        usleep(1000);
    SETUP_CHECK(filtered == 1, "seccomp filter");
}

/* Lock everything, now and later, and leave less than 4 pages of RLIMIT_MEMLOCK. */
static void lock_all_to_the_limit(void)
{
    struct rlimit r;
    SETUP_CHECK(getrlimit(RLIMIT_MEMLOCK, &r) == 0, "getrlimit memlock");
    if (r.rlim_cur > 8 * MIB) { /* unlimited here or there: 8 MiB, the usual default */
        r.rlim_cur = 8 * MIB;
        SETUP_CHECK(setrlimit(RLIMIT_MEMLOCK, &r) == 0, "setrlimit memlock");
    }
    SETUP_CHECK(mlockall(MCL_CURRENT | MCL_FUTURE) == 0, "mlockall");
    long have = status_kb("VmLck:") * 1024;
    SETUP_CHECK(have > 0 && (rlim_t)have + 2 * WL_PAGE < r.rlim_cur, "room to fill");
    size_t pad = r.rlim_cur - (rlim_t)have - 2 * WL_PAGE;
    void *p = mmap(NULL, pad, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    SETUP_CHECK(p != MAP_FAILED, "mmap up to the limit");
    lockall = 1;
}

/* ---- main ------------------------------------------------------------------------ */

static void wait_usr2(sigset_t *old)
{
    while (!got_usr2)
        sigsuspend(old);
    got_usr2 = 0;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "self";
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    pid_t child = 0;

    if (strcmp(mode, "tree") == 0) {
        int ready[2];
        SETUP_CHECK(pipe(ready) == 0, "pipe");
        child = fork();
        SETUP_CHECK(child >= 0, "fork");
        if (child == 0) {
            close(ready[0]);
            setup_memory(7, 12 * MIB);
            drop_to_nobody();
            set_limits();
            remember_creds();
            SETUP_CHECK(write(ready[1], "x", 1) == 1, "child ready");
            close(ready[1]);
            wait_usr2(&old);
            check_self();
            finish("role=child");
        }
        close(ready[1]);
        char c;
        SETUP_CHECK(read(ready[0], &c, 1) == 1, "child set up");
        close(ready[0]);
        setup_memory(3, MIB);
    } else if (strcmp(mode, "drop") == 0) {
        setup_memory(5, 12 * MIB);
        drop_to_nobody();
    } else {
        SETUP_CHECK(strcmp(mode, "self") == 0 || strcmp(mode, "seccomp") == 0 ||
                        strcmp(mode, "threads") == 0 || strcmp(mode, "lockall") == 0,
                    "mode");
        setup_memory(9, MIB);
        if (strcmp(mode, "seccomp") == 0 || strcmp(mode, "threads") == 0)
            start_thread(strcmp(mode, "seccomp") == 0);
        for (int i = 0; i < 3 && strcmp(mode, "threads") == 0; i++)
            start_thread(0); /* plain threads: nothing to wait for */
        if (strcmp(mode, "lockall") == 0)
            lock_all_to_the_limit();
    }
    set_limits();
    remember_creds();
    say("READY pid=%d child=%d uid=%d", (int)getpid(), (int)child, (int)getuid());

    wait_usr2(&old);
    check_self();
    if (child) {
        kill(child, SIGUSR2);
        int st;
        CHECK(waitpid(child, &st, 0) == child && WIFEXITED(st) && WEXITSTATUS(st) == 0,
              "child_failed");
    }
    char extra[32];
    snprintf(extra, sizeof(extra), "uid=%d", (int)getuid());
    finish(extra);
}
