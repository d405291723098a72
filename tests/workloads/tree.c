/* tree: a process tree sharing memory and open files.
 *
 * usage: tree [zombie [core]]
 *   root ─┬─ a ── a1          a1 joins b's process group
 *         └─ b                b leads its own process group
 * zombie: the tree also holds children that have exited and are not reaped yet:
 *   root ─┬─ zexit            exit(42)
 *         ├─ zsig             killed by SIGTERM
 *         ├─ zlead            leads a process group, exit(7); a is in its group
 *         ├─ zlate            alive, in pause(), until SIGUSR1 kills it (a test may
 *         │                   send it between a dump's rounds, or snapshots)
 *         └─ a ── za          killed by SIGUSR1 (core: by SIGABRT, dumping core)
 * After the check their parents reap them and check the status (WIFEXITED and
 * WEXITSTATUS, or WIFSIGNALED, WTERMSIG and WCOREDUMP) and zlead's group; the root
 * sends zlate SIGUSR1 first (nothing happens if it is a zombie already).
 * The root handles SIGCHLD but keeps it blocked, and takes the pending ones before
 * READY: when told to check, SIGCHLD is pending only if zlate died since, with its
 * siginfo (a restore must neither add nor lose one).
 * READY ... zexit= zsig= zlead= zlate= za=
 * All four map one MAP_SHARED|MAP_ANONYMOUS area (created before the forks) and
 * share the inherited log and a data file opened before the forks (one open file
 * description: one offset). Each also has 2 MiB of private memory with its own
 * pattern.
 *
 * READY pid= a= a1= b=
 * On SIGUSR2 the root tells everybody to check (a flag in the shared area).
 * Each process then: checks its private memory, its parent (getppid), its
 * process group and session, writes a token into its slot of the shared area
 * and waits to see every other process's token (so the area is really shared
 * again), and reads 4 bytes of the shared file (the offset moves for all).
 * Parents wait for their children and check their exit status.
 * VERIFY OK pid= offset=16   or   VERIFY FAIL pid= reason=
 */
#include "wl.h"

#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>

#define PRIV (2UL << 20)
enum { ROOT, A, A1, B, N };

struct shared {
    volatile int go;
    volatile pid_t pid[N];
    volatile uint64_t token[N];
    volatile int done[N];
    volatile int fail[N];
    volatile int b_wrote;
    volatile pid_t want_pgid_a; /* root's group, or zlead's */
    volatile pid_t za;
    volatile int zlead_go;
    char why[N][128];
};
static int zombies, core;

static struct shared *sh;
/* shared too, but only b ever touches page 3 of it before the dump: its only copy
   is in b's page tables (the owner, root, must still get it back) */
static volatile uint64_t *only_b;
/* a memfd mapped MAP_SHARED by everybody (and its fd inherited): tokens go through it */
static volatile uint64_t *mfd;
static int memfd;
static int datafd;
static volatile sig_atomic_t got_usr2;

static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static void on_chld(int sig)
{
    (void)sig;
}

static void note(int me, const char *why)
{
    sh->fail[me] = 1;
    snprintf(sh->why[me], sizeof(sh->why[me]), "%s", why);
}

static int wait_all(volatile int *flags, double secs)
{
    double end = mono_now() + secs;
    for (;;) {
        int all = 1;
        for (int i = 0; i < N; i++)
            all &= flags[i] != 0;
        if (all)
            return 1;
        if (mono_now() > end)
            return 0;
        usleep(1000);
    }
}

/* the part every process runs once told to check */
static void check(int me, unsigned char *priv, pid_t parent, pid_t want_pgid, pid_t want_sid)
{
    if (hash_mem(priv, PRIV, 0) != ({
            unsigned char *ref = malloc(PRIV);
            fill(ref, PRIV, 1000 + (uint64_t)me);
            uint64_t h = hash_mem(ref, PRIV, 0);
            free(ref);
            h;
        }))
        note(me, "private_memory");
    if (getppid() != parent)
        note(me, "parent");
    if (getpgid(0) != want_pgid)
        note(me, "pgid");
    if (getsid(0) != want_sid)
        note(me, "sid");
    sh->token[me] = 0xC0FFEE00ULL + (uint64_t)me;
    double end = mono_now() + 30;
    for (int i = 0; i < N; i++)
        while (sh->token[i] != 0xC0FFEE00ULL + (uint64_t)i && mono_now() < end)
            usleep(1000);
    for (int i = 0; i < N; i++)
        if (sh->token[i] != 0xC0FFEE00ULL + (uint64_t)i)
            note(me, "shared_memory_not_shared");
    mfd[64 * me] = 0xF00D00ULL + (uint64_t)me;
    end = mono_now() + 30;
    for (int i = 0; i < N; i++)
        while (mfd[64 * i] != 0xF00D00ULL + (uint64_t)i && mono_now() < end)
            usleep(1000);
    for (int i = 0; i < N; i++)
        if (mfd[64 * i] != 0xF00D00ULL + (uint64_t)i)
            note(me, "memfd_not_shared");
    uint64_t first;
    if (pread(memfd, &first, 8, 8192) != 8 || first != 0x5EED5EEDULL)
        note(me, "memfd_content");
    char buf[4];
    if (read(datafd, buf, 4) != 4)
        note(me, "shared_file_read");
    sh->done[me] = 1;
}

static void child_loop(int me, unsigned char *priv, pid_t parent, pid_t pgid, pid_t sid)
{
    while (!sh->go)
        usleep(2000);
    check(me, priv, parent, pgid, sid);
}

static int reap(pid_t p, const char *name, int me)
{
    int st;
    if (waitpid(p, &st, 0) != p) {
        char b[64];
        snprintf(b, sizeof(b), "waitpid_%s", name);
        note(me, b);
        return 0;
    }
    return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

/* a child that exits (sig 0: exit(code)) or dies of sig (core: with a core dump),
   left unreaped: its exit is waited for with WNOWAIT */
static pid_t make_zombie(int code, int sig, int dump)
{
    pid_t z = fork();
    SETUP_CHECK(z >= 0, "fork zombie");
    if (z == 0) {
        if (!sig)
            _exit(code);
        if (dump) { /* a core of almost nothing, in our directory */
            struct rlimit rl = {RLIM_INFINITY, RLIM_INFINITY};
            setrlimit(RLIMIT_CORE, &rl);
            int f = open("/proc/self/coredump_filter", O_WRONLY);
            if (f >= 0) {
                if (write(f, "0", 1) != 1)
                    _exit(98);
                close(f);
            }
        }
        signal(sig, SIG_DFL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        raise(sig);
        _exit(99);
    }
    siginfo_t si;
    memset(&si, 0, sizeof(si));
    SETUP_CHECK(waitid(P_PID, (id_t)z, &si, WEXITED | WNOWAIT) == 0, "waitid zombie");
    return z;
}

/* reap a zombie made by make_zombie and check its status */
static int reap_zombie(pid_t z, int code, int sig, int dump)
{
    int st;
    if (waitpid(z, &st, 0) != z)
        return 0;
    if (!sig)
        return WIFEXITED(st) && WEXITSTATUS(st) == code;
    return WIFSIGNALED(st) && WTERMSIG(st) == sig && !!WCOREDUMP(st) == !!dump;
}

static unsigned char *private_area(int me)
{
    unsigned char *p =
        mmap(NULL, PRIV, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    SETUP_CHECK(p != MAP_FAILED, "mmap private");
    fill(p, PRIV, 1000 + (uint64_t)me);
    return p;
}

int main(int argc, char **argv)
{
    pid_t zexit = 0, zsig = 0, zlead = 0, zlate = 0;
    sigset_t old;
    zombies = argc > 1 && strcmp(argv[1], "zombie") == 0;
    core = zombies && argc > 2 && strcmp(argv[2], "core") == 0;
    catch_usr2_blocked(on_usr2, &old);
    sh = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    SETUP_CHECK(sh != MAP_FAILED, "mmap shared");
    only_b = mmap(NULL, 16 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    SETUP_CHECK(only_b != MAP_FAILED, "mmap only_b");
    memfd = memfd_create("treemem", 0);
    SETUP_CHECK(memfd >= 0 && ftruncate(memfd, 16 * 4096) == 0, "memfd");
    mfd = mmap(NULL, 16 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    SETUP_CHECK(mfd != MAP_FAILED, "mmap memfd");
    mfd[1024] = 0x5EED5EEDULL; /* offset 8192 */
    datafd = open("data", O_RDWR | O_CREAT | O_TRUNC, 0644);
    SETUP_CHECK(datafd >= 0, "open data");
    SETUP_CHECK(write(datafd, "0123456789abcdef0123456789abcdef", 32) == 32, "write data");
    SETUP_CHECK(lseek(datafd, 0, SEEK_SET) == 0, "lseek");
    pid_t root = getpid(), sid = getsid(0);
    sh->pid[ROOT] = root;
    sh->want_pgid_a = root;

    pid_t b = fork();
    SETUP_CHECK(b >= 0, "fork b");
    if (b == 0) {
        setpgid(0, 0);
        unsigned char *priv = private_area(B);
        sh->pid[B] = getpid();
        only_b[3 * 512] = 0xB0B0B0B0ULL;
        sh->b_wrote = 1;
        child_loop(B, priv, root, getpid(), sid);
        _exit(sh->fail[B]);
    }
    setpgid(b, b); /* no race with the child's own call */
    sigset_t chld, waitmask = old;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    struct timespec now0 = {0, 0};
    if (zombies) {
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = on_chld;
        SETUP_CHECK(sigaction(SIGCHLD, &sa, NULL) == 0, "sigaction SIGCHLD");
        sigprocmask(SIG_BLOCK, &chld, NULL);
        sigaddset(&waitmask, SIGCHLD);
        zlead = fork();
        SETUP_CHECK(zlead >= 0, "fork zlead");
        if (zlead == 0) {
            setpgid(0, 0);
            while (!sh->zlead_go)
                usleep(1000);
            _exit(7);
        }
        setpgid(zlead, zlead);
        sh->want_pgid_a = zlead;
    }
    pid_t a = fork();
    SETUP_CHECK(a >= 0, "fork a");
    if (a == 0) {
        if (zombies)
            setpgid(0, sh->want_pgid_a);
        unsigned char *priv = private_area(A);
        sh->pid[A] = getpid();
        pid_t a1 = fork();
        if (a1 == 0) {
            setpgid(0, b);
            unsigned char *p1 = private_area(A1);
            sh->pid[A1] = getpid();
            child_loop(A1, p1, sh->pid[A], b, sid);
            _exit(sh->fail[A1]);
        }
        setpgid(a1, b);
        int zsig_a = core ? SIGABRT : SIGUSR1;
        if (zombies)
            sh->za = make_zombie(0, zsig_a, core);
        child_loop(A, priv, root, sh->want_pgid_a, sid);
        if (zombies && !reap_zombie(sh->za, 0, zsig_a, core))
            note(A, "zombie_za_status");
        if (!reap(a1, "a1", A))
            note(A, "a1_failed");
        _exit(sh->fail[A]);
    }
    if (zombies)
        setpgid(a, zlead);
    unsigned char *priv = private_area(ROOT);
    double end = mono_now() + 30;
    while ((!sh->pid[A] || !sh->pid[A1] || !sh->pid[B]) && mono_now() < end)
        usleep(1000);
    SETUP_CHECK(sh->pid[A] && sh->pid[A1] && sh->pid[B], "children started");
    while (!sh->b_wrote && mono_now() < end)
        usleep(1000);
    /* wait until a1 is in b's group (setpgid by a1 or a) */
    while (getpgid(sh->pid[A1]) != b && mono_now() < end)
        usleep(1000);
    if (zombies) {
        zlate = fork();
        SETUP_CHECK(zlate >= 0, "fork zlate");
        if (zlate == 0)
            for (;;)
                pause(); /* SIGUSR1: default action, not blocked */
        zexit = make_zombie(42, 0, 0);
        zsig = make_zombie(0, SIGTERM, 0);
        while (getpgid(a) != zlead && mono_now() < end)
            usleep(1000);
        SETUP_CHECK(getpgid(a) == zlead, "a in zlead's group");
        sh->zlead_go = 1;
        siginfo_t si;
        memset(&si, 0, sizeof(si));
        SETUP_CHECK(waitid(P_PID, (id_t)zlead, &si, WEXITED | WNOWAIT) == 0, "waitid zlead");
        while (!sh->za && mono_now() < end)
            usleep(1000);
        SETUP_CHECK(sh->za, "za made");
        while (sigtimedwait(&chld, NULL, &now0) == SIGCHLD)
            ;
    }
    say("READY pid=%d a=%d a1=%d b=%d zexit=%d zsig=%d zlead=%d zlate=%d za=%d", (int)root,
        (int)sh->pid[A], (int)sh->pid[A1], (int)sh->pid[B], (int)zexit, (int)zsig, (int)zlead,
        (int)zlate, (int)sh->za);

    while (!got_usr2)
        sigsuspend(&waitmask);
    if (zombies) {
        siginfo_t si, wi;
        memset(&si, 0, sizeof(si));
        memset(&wi, 0, sizeof(wi));
        int got = sigtimedwait(&chld, &si, &now0);
        waitid(P_PID, (id_t)zlate, &wi, WEXITED | WNOWAIT | WNOHANG);
        if (wi.si_pid == zlate)
            CHECK(got == SIGCHLD && si.si_pid == zlate && si.si_code == CLD_KILLED &&
                      si.si_status == SIGUSR1,
                  "sigchld_of_zlate:got=%d,pid=%d", got, (int)si.si_pid);
        else
            CHECK(got < 0, "spurious_sigchld:pid=%d", (int)si.si_pid);
        CHECK(getpgid(zlead) == zlead, "zombie_zlead_pgid");
        CHECK(reap_zombie(zexit, 42, 0, 0), "zombie_zexit_status");
        CHECK(reap_zombie(zsig, 0, SIGTERM, 0), "zombie_zsig_status");
        CHECK(kill(zlate, SIGUSR1) == 0, "kill_zlate");
        CHECK(reap_zombie(zlate, 0, SIGUSR1, 0), "zombie_zlate_status");
    }
    sh->go = 1;
    check(ROOT, priv, getppid(), root, sid);
    if (!wait_all(sh->done, 60))
        fail("not_everybody_checked");
    CHECK(reap(a, "a", ROOT), "a_failed");
    CHECK(reap(b, "b", ROOT), "b_failed");
    if (zombies) /* after a: its group stays zlead's while a lives */
        CHECK(reap_zombie(zlead, 7, 0, 0), "zombie_zlead_status");
    for (int i = 0; i < N; i++)
        if (sh->fail[i])
            fail("member%d:%s", i, sh->why[i]);
    CHECK(only_b[3 * 512] == 0xB0B0B0B0ULL, "page_only_b_touched_lost");
    off_t off = lseek(datafd, 0, SEEK_CUR);
    CHECK(off == 16, "shared_offset=%ld", (long)off);
    char extra[32];
    snprintf(extra, sizeof(extra), "offset=%ld", (long)off);
    finish(extra);
}
